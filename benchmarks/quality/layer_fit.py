"""How well GSPN processors can stand in for each self-attention of the trained teacher: the layerwise stage
alone, on the CPU, per proxy width.

    python3 -m benchmarks.quality.layer_fit --teacher .carry/teacher --data .carry/eval --ratios 8 2

The teacher denoises ``--images`` noised train images (one fixed timestep and noise each); every ``attn1``
records its input tokens and output. For each ``proxy_ratio`` a student adapter (``GSPNAdapter.for_unet``)
is fitted on the first three quarters of those tokens, each processor alone against its layer's output
(the relative feature loss of the distillation's layerwise stage, Adam, ``--steps`` steps of 16), and is
measured on the last quarter: per-layer relative error at initialisation and after the fit, and the
held-out denoising loss of the whole student at both points (test subset, 2 draws, as ``evaluate``'s with
fewer images). The teacher's held-out loss and that of the model without self-attention (untrained) are
the two ends of the scale.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

from benchmarks.quality import core
from benchmarks.quality.evaluate import OutputRecorder, make_control
from gspn_diffusers import GSPNAdapter
from gspn_diffusers.adapter import self_attention_layers
from gspn_diffusers.distill.losses import relative_feature_loss


@torch.no_grad()
def record_attention(teacher: core.ClassConditionedUNet, images: torch.Tensor, labels: torch.Tensor, seed: int,
                     batch: int = 32) -> tuple[dict, dict]:
    """{layer: (N_images, tokens, C)} inputs and outputs of every attn1 while the teacher denoises the images
    noised at one random timestep each."""
    layers = self_attention_layers(teacher.unet)
    tap = OutputRecorder({layer: teacher.unet.get_submodule(layer) for layer in layers})
    generator = torch.Generator().manual_seed(seed)
    x0 = core.to_model_space(images)
    t = torch.randint(0, core.TRAIN_TIMESTEPS, (len(x0),), generator=generator)
    xt = core.noise_scheduler().add_noise(x0, torch.randn(x0.shape, generator=generator), t)
    inputs, outputs = {layer: [] for layer in layers}, {layer: [] for layer in layers}
    try:
        for start in range(0, len(x0), batch):
            teacher(xt[start:start + batch], t[start:start + batch], labels[start:start + batch])
            for layer in layers:
                inputs[layer].append(tap.inputs[layer])
                outputs[layer].append(tap.outputs[layer])
    finally:
        tap.remove()
    return ({layer: torch.cat(v) for layer, v in inputs.items()}, {layer: torch.cat(v) for layer, v in outputs.items()})


def fit(teacher: core.ClassConditionedUNet, inputs: dict, outputs: dict, proxy_ratio: int, steps: int, lr: float,
        seed: int, test_images: torch.Tensor, test_labels: torch.Tensor) -> dict:
    """Fit a fresh student's processors layer by layer; its errors and held-out loss before and after."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher)
    adapter = GSPNAdapter.for_unet(student.unet, proxy_ratio=proxy_ratio, gate_groups=1)
    adapter.mount(student.unet, match_dtype=False)
    processors = adapter.processors_by_layer()
    count = len(next(iter(inputs.values())))
    train_count = count * 3 // 4
    for layer, processor in processors.items():
        side = math.isqrt(inputs[layer].shape[1])
        processor.grid = (side, side)

    def errors(index) -> torch.Tensor:  # (layers,) mean relative error
        return torch.stack([
            relative_feature_loss(processor(student.unet.get_submodule(layer), inputs[layer][index]),
                                  outputs[layer][index]).mean()
            for layer, processor in processors.items()])

    def heldout() -> float:
        with torch.no_grad():
            return core.heldout_loss(student.eval(), test_images, test_labels, draws=2, batch=125)

    with torch.no_grad():
        initial = errors(slice(train_count, count))
    row = dict(proxy_ratio=proxy_ratio, proxy_widths=sorted({p.proxy_dim for p in processors.values()}),
               layer_error_init=initial.tolist(), heldout_init=heldout())
    optimizer = torch.optim.Adam(adapter.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = errors(torch.randint(0, train_count, (16,), generator=generator)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        row["layer_error_fit"] = errors(slice(train_count, count)).tolist()
    row["heldout_fit"] = heldout()
    return row


def table(rows: list[dict], teacher_loss: float, no_attention_loss: float, layers: list[str]) -> str:
    lines = [f"held-out loss: teacher {teacher_loss:.5f}, without self-attention (untrained) {no_attention_loss:.5f}",
             "", "| proxy ratio | Cp | mean layer error, init -> fit | worst layer, fit | held-out loss, init -> fit |",
             "|---|---|---|---|---|"]
    for row in rows:
        init, fitted = row["layer_error_init"], row["layer_error_fit"]
        worst = max(range(len(fitted)), key=fitted.__getitem__)
        lines.append(f"| {row['proxy_ratio']} | {', '.join(map(str, row['proxy_widths']))} | "
                     f"{sum(init) / len(init):.3f} -> {sum(fitted) / len(fitted):.3f} | "
                     f"{fitted[worst]:.3f} ({layers[worst].split('.transformer_blocks')[0]}) | "
                     f"{row['heldout_init']:.5f} -> {row['heldout_fit']:.5f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="folder written by train_teacher.py")
    parser.add_argument("--data", required=True, help="folder holding train_jpeg.npz and test_jpeg.npz")
    parser.add_argument("--ratios", type=int, nargs="+", default=[8, 2], help="proxy ratios to fit")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--images", type=int, default=128, help="noised train images whose tokens are fitted")
    parser.add_argument("--test_images", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="few images and steps (tests)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.test_images, args.steps = 8, 8, 2
    began = time.time()
    teacher = core.load_model(args.teacher, "cpu").eval().requires_grad_(False)
    images, labels = core.decode_split(Path(args.data) / "train_jpeg.npz", args.images)
    test_images, test_labels = core.decode_split(Path(args.data) / "test_jpeg.npz", args.test_images)
    inputs, outputs = record_attention(teacher, images, labels, args.seed)
    with torch.no_grad():
        teacher_loss = core.heldout_loss(teacher, test_images, test_labels, draws=2, batch=125)
        no_attention_loss = core.heldout_loss(make_control(teacher)[0].eval(), test_images, test_labels, draws=2,
                                              batch=125)
    rows = []
    for ratio in args.ratios:
        rows.append(fit(teacher, inputs, outputs, ratio, args.steps, args.lr, args.seed, test_images, test_labels))
        core.log(f"proxy ratio {ratio} done")
    layers = list(inputs)
    print(table(rows, teacher_loss, no_attention_loss, layers))
    print(f"\n{args.images} images, {args.steps} steps of 16, lr {args.lr}, {time.time() - began:.0f} s on the CPU")
    return dict(teacher=teacher_loss, no_attention=no_attention_loss, layers=layers, rows=rows)


if __name__ == "__main__":
    main()
