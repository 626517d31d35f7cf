"""Per-layer fidelity of the student: how close each GSPN layer's output is to its softmax teacher's.

For a fixed batch and a few timesteps, the teacher (adapter unmounted) and the student (mounted) run
the same noisy latents; for every replaced layer the report gives, averaged over samples and timesteps,

    relative L2 error   ||s - t|| / ||t||        (0 is perfect)
    cosine similarity   <s, t> / (||s|| ||t||)   (1 is perfect)

of the attn1 outputs s (student) and t (teacher), plus the per-timestep values. Weak layers stand out
in the printed table (sorted as in the UNet, the worst ones marked).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gspn_diffusers.distill.student import teacher_mode

REPORT_FILE = "fidelity_report.json"


def _layer_scores(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    rel_l2 = (s - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)
    cosine = torch.nn.functional.cosine_similarity(s, t, dim=1, eps=1e-12)
    return rel_l2, cosine


def fidelity_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """``count`` timesteps spread evenly over [0, T), high noise to low."""
    if count == 1:
        return [num_train_timesteps // 2]
    return [round(x) for x in torch.linspace(num_train_timesteps - 1, 0, count).tolist()]


@torch.no_grad()
def measure_fidelity(unet, adapter, tap, scheduler, inputs: dict, timesteps: list[int], autocast) -> dict:
    """The report as a dict. ``inputs``: latents, noise (B, ...), encoder_hidden_states, added_cond_kwargs."""
    latents, noise = inputs["latents"], inputs["noise"]
    per_layer = {layer: dict(relative_l2=[], cosine=[]) for layer in tap.layers}
    for step in timesteps:
        t = torch.full((latents.shape[0],), step, device=latents.device, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, t).to(inputs["dtype"])
        call = dict(encoder_hidden_states=inputs["encoder_hidden_states"],
                    added_cond_kwargs=inputs["added_cond_kwargs"])
        with teacher_mode(adapter, unet), tap.capture() as teacher, autocast():
            unet(noisy, t, **call)
        with tap.capture() as student, autocast():
            unet(noisy, t, **call)
        for layer in tap.layers:
            rel_l2, cosine = _layer_scores(student["outputs"][layer], teacher["outputs"][layer])
            per_layer[layer]["relative_l2"].append(rel_l2.mean().item())
            per_layer[layer]["cosine"].append(cosine.mean().item())
    layers = {
        layer: dict(
            relative_l2=sum(v["relative_l2"]) / len(timesteps),
            cosine=sum(v["cosine"]) / len(timesteps),
            relative_l2_per_timestep=v["relative_l2"],
            cosine_per_timestep=v["cosine"],
        )
        for layer, v in per_layer.items()
    }
    mean = dict(
        relative_l2=sum(v["relative_l2"] for v in layers.values()) / len(layers),
        cosine=sum(v["cosine"] for v in layers.values()) / len(layers),
    )
    return dict(timesteps=timesteps, num_samples=int(latents.shape[0]), mean=mean, layers=layers)


def format_table(report: dict, worst: int = 3) -> str:
    """The report as a fixed-width table; the ``worst`` layers by relative L2 error are marked ``<<``."""
    layers = report["layers"]
    ranked = sorted(layers, key=lambda name: layers[name]["relative_l2"], reverse=True)[:worst]
    width = max(len(name) for name in layers)
    head = (f"step {report.get('step', '?')}: fidelity over timesteps {report['timesteps']}, "
            f"{report['num_samples']} sample(s)")
    lines = [head, f"{'layer':<{width}}  {'rel L2':>8}  {'cosine':>8}"]
    for name, scores in layers.items():
        mark = "  <<" if name in ranked else ""
        lines.append(f"{name:<{width}}  {scores['relative_l2']:8.4f}  {scores['cosine']:8.4f}{mark}")
    mean = report["mean"]
    lines.append(f"{'mean':<{width}}  {mean['relative_l2']:8.4f}  {mean['cosine']:8.4f}")
    return "\n".join(lines)


def write_report(report: dict, folder: str | Path) -> Path:
    path = Path(folder) / REPORT_FILE
    path.write_text(json.dumps(report, indent=2))
    return path
