"""Distil GSPN students and a no-self-attention control from the trained teacher, then measure all of them.

    python3 -m benchmarks.quality.evaluate --teacher .carry/teacher --data .carry/eval \
        --inception .carry/eval/inception_fid_fp16.pt --out $OUT --minutes 0.5

Models (rows): the teacher; the control (every attn1 returns zeros, i.e. the blocks without
self-attention, whole UNet fine-tuned with the noise + KD losses); one student per recipe (the teacher with
``GSPNAdapter.for_unet`` mounted, only the adapter trained, with the distillation's noise, KD and per-layer
feature losses and an optional layerwise stage). Every model trains for the same budget: ``--minutes`` of
wall-clock time, or ``--steps`` optimizer steps (the same for every row however the GPU is shared; the
layerwise stage and the learning-rate schedule then follow the steps, and ``--minutes`` is a cap).

Metrics: held-out epsilon loss on the test subset (same noise and timesteps for every model) and the share
of the control-to-teacher gap a model recovers; FID and KID of ``--samples`` guided samples against the
train subset; FID against the teacher's samples; paired per-seed PSNR to the teacher's samples (same
initial noise and labels). Each model's row goes to <out>/rows/<model>.json; <out>/quality.json and
<out>/quality.md gather every row there, so the models can run as parallel processes on one GPU:

    for m in teacher control default no_layerwise; do python3 -m benchmarks.quality.evaluate ... --models $m & done
    wait; python3 -m benchmarks.quality.evaluate ... --models ""    # the report of all rows
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.quality import core, fid
from gspn_diffusers import GSPNAdapter
from gspn_diffusers.adapter import self_attention_layers
from gspn_diffusers.distill.args import positive_int
from gspn_diffusers.distill.losses import per_sample_mse, prediction_target, relative_feature_loss


@dataclass(frozen=True)
class Recipe:
    name: str
    lr: float = 1e-3
    layerwise_fraction: float = 0.1  # share of the budget spent in the layerwise stage
    noise_weight: float = 1.0
    kd_weight: float = 1.0
    feature_weight: float = 1.0
    warmup_fraction: float = 0.025


# The defaults of examples/distill.sh (lr 1e-3, cosine, warm-up 500 and layerwise 2000 of 20000 steps,
# all loss weights 1) scaled to the budget, and what changes when one of them moves.
RECIPES = {
    "default": Recipe("default"),
    "no_layerwise": Recipe("no_layerwise", layerwise_fraction=0.0),
    "no_feature": Recipe("no_feature", layerwise_fraction=0.0, feature_weight=0.0),
    "lr1e-4": Recipe("lr1e-4", lr=1e-4),
}
# The control trains the whole UNet (3.7 M parameters, not the adapter's 20,676): a fine-tuning rate.
CONTROL = Recipe("control", lr=1e-4, layerwise_fraction=0.0, feature_weight=0.0)


class ZeroSelfAttention(nn.Module):
    """An attn1 processor whose branch outputs zeros: the transformer block without self-attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        return torch.zeros_like(hidden_states)


class OutputRecorder:
    """Forward hooks on attention modules: ``inputs`` / ``outputs`` {layer: tensor} of the last forward."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.inputs, self.outputs = {}, {}
        self.handles = []
        for layer, module in modules.items():
            self.handles.append(module.register_forward_hook(self._hook(layer), with_kwargs=True))

    def _hook(self, layer):
        def hook(module, args, kwargs, output):
            self.inputs[layer] = args[0] if args else kwargs["hidden_states"]
            self.outputs[layer] = output

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def distill(student: core.ClassConditionedUNet, teacher: core.ClassConditionedUNet, params: list,
            recipe: Recipe, images, labels, seconds: float, batch: int, seed: int,
            adapter: GSPNAdapter | None = None, max_steps: int | None = None) -> dict:
    """Train ``params`` of ``student`` toward ``teacher`` for ``seconds``; returns the run's summary."""
    device = images.device
    layers = self_attention_layers(teacher.unet)
    teacher_tap = OutputRecorder({layer: teacher.unet.get_submodule(layer) for layer in layers})
    student_tap = OutputRecorder({layer: student.unet.get_submodule(layer) for layer in layers})
    scheduler = core.noise_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(seed)
    summary = dict(recipe=asdict(recipe), steps=0, layerwise_steps=0)
    # One untimed forward + backward, so that building the GSPN extension and first-call set-up are not
    # charged to the budget; its gradients are dropped.
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        warm = student(core.to_model_space(images[:2]), torch.tensor([10, 500], device=device), labels[:2])
    warm.float().mean().backward()
    for param in params:
        param.grad = None
    began = time.time()
    try:
        while True:
            elapsed = time.time() - began
            if elapsed >= seconds or (max_steps is not None and summary["steps"] >= max_steps):
                break
            progress = elapsed / seconds
            if max_steps is not None:
                progress = max(progress, summary["steps"] / max_steps)
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * min(1.0, progress / max(recipe.warmup_fraction, 1e-9)) * 0.5 * (
                    1 + math.cos(math.pi * progress))
            index = torch.randint(0, len(images), (batch,), device=device, generator=generator)
            x0 = core.to_model_space(core.random_flip(images[index], generator))
            drop = torch.rand(batch, device=device, generator=generator) < 0.1
            y = torch.where(drop, core.UNCONDITIONAL, labels[index])
            noise = torch.randn(x0.shape, device=device, generator=generator)
            t = torch.randint(0, core.TRAIN_TIMESTEPS, (batch,), device=device, generator=generator)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            layerwise = adapter is not None and progress < recipe.layerwise_fraction
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                with torch.no_grad():
                    teacher_prediction = teacher(xt, t, y)
                if layerwise:
                    # each processor alone on its teacher layer's input tokens (square grids here)
                    per_layer = []
                    for layer, processor in adapter.processors_by_layer().items():
                        tokens = teacher_tap.inputs[layer]
                        side = math.isqrt(tokens.shape[1])
                        processor.grid = (side, side)
                        output = processor(student.unet.get_submodule(layer), tokens)
                        per_layer.append(relative_feature_loss(output, teacher_tap.outputs[layer]))
                    loss = torch.stack(per_layer).mean()
                    summary["layerwise_steps"] += 1
                else:
                    prediction = student(xt, t, y)
                    noise_loss = per_sample_mse(prediction, prediction_target(scheduler, x0, noise, t))
                    kd_loss = per_sample_mse(prediction, teacher_prediction)
                    loss = recipe.noise_weight * noise_loss + recipe.kd_weight * kd_loss
                    if recipe.feature_weight > 0:
                        feature = torch.stack([relative_feature_loss(student_tap.outputs[layer],
                                                                     teacher_tap.outputs[layer])
                                               for layer in layers]).mean(0)
                        loss = loss + recipe.feature_weight * feature
                    loss = loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            summary["steps"] += 1
    finally:
        teacher_tap.remove()
        student_tap.remove()
    summary["seconds"] = round(time.time() - began, 1)
    summary["final_loss"] = loss.item() if summary["steps"] else None
    return summary


def make_control(teacher: core.ClassConditionedUNet) -> tuple[core.ClassConditionedUNet, list]:
    control = copy.deepcopy(teacher)
    processors = dict(control.unet.attn_processors)
    for layer in self_attention_layers(control.unet):
        processors[layer + ".processor"] = ZeroSelfAttention()
    control.unet.set_attn_processor(processors)
    control.requires_grad_(False)
    control.unet.requires_grad_(True)
    return control, [p for p in control.unet.parameters() if p.requires_grad]


def make_student(teacher: core.ClassConditionedUNet) -> tuple[core.ClassConditionedUNet, GSPNAdapter, list]:
    student = copy.deepcopy(teacher)
    student.requires_grad_(False)
    adapter = GSPNAdapter.for_unet(student.unet, proxy_ratio=8, gate_groups=1)
    adapter.mount(student.unet, match_dtype=False)
    adapter.requires_grad_(True)
    return student, adapter, list(adapter.parameters())


MODEL_ORDER = ["teacher", "control", *(f"student:{name}" for name in RECIPES)]


def write_report(out: Path, meta: dict) -> list[dict]:
    """Gather the rows in <out>/rows (written by any number of processes), add the gap recovered, and write
    <out>/quality.json and <out>/quality.md (written to temporary names, then renamed). Returns the rows."""
    rows = sorted((json.loads(path.read_text()) for path in (out / "rows").glob("*.json")),
                  key=lambda row: MODEL_ORDER.index(row["model"]))
    by_name = {row["model"]: row for row in rows}
    if "teacher" in by_name and "control" in by_name:
        gap = by_name["control"]["heldout_loss"] - by_name["teacher"]["heldout_loss"]
        for row in rows:
            if row["model"] != "teacher":
                row["gap_recovered"] = (by_name["control"]["heldout_loss"] - row["heldout_loss"]) / gap if gap else None
    header = ("| model | held-out loss | gap recovered | FID | KID x1e3 | FID vs teacher | PSNR vs teacher (dB) "
              "| train steps |\n|---|---|---|---|---|---|---|---|\n")

    def cell(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [f"| {r['model']} | {r['heldout_loss']:.5f} | {cell(r.get('gap_recovered'), '.1%')} | "
             f"{cell(r.get('fid'), '.2f')} | {cell(r.get('kid') and r['kid'] * 1e3, '.2f')} | "
             f"{cell(r.get('fid_vs_teacher'), '.2f')} | {cell(r.get('psnr_vs_teacher'), '.2f')} | "
             f"{r.get('train', {}).get('steps', '-')} |" for r in rows]
    notes = ", ".join(f"{k} {v}" for k, v in meta.items() if not isinstance(v, (dict, list)))
    for name, text in (("quality.json", json.dumps(dict(meta=meta, rows=rows), indent=1)),
                       ("quality.md", header + "\n".join(lines) + f"\n\n{notes}\n")):
        temporary = out / f".{name}.{os.getpid()}"
        temporary.write_text(text)
        temporary.replace(out / name)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="folder written by train_teacher.py")
    parser.add_argument("--data", required=True, help="folder holding train_jpeg.npz and test_jpeg.npz")
    parser.add_argument("--inception", help="the float16 FID Inception TorchScript file (not with --tiny)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=0.5, help="training budget of each distilled model")
    parser.add_argument("--steps", type=positive_int, help="train each distilled model this many steps (--minutes: a cap)")
    parser.add_argument("--models", default=",".join(["teacher", "control", *RECIPES]),
                        help=f"comma-separated, from teacher, control, {', '.join(RECIPES)} (student recipes); "
                             "empty: only gather the rows in --out into the report")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--sampling_steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="CPU, few images and samples, random features")
    args = parser.parse_args(argv)
    names = [name for name in args.models.split(",") if name]
    unknown = [name for name in names if name not in ("teacher", "control", *RECIPES)]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from teacher, control, {', '.join(RECIPES)}")
    args.models = names
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    samples, batch = (16, 4) if args.tiny else (args.samples, args.batch)
    sampling_steps = 3 if args.tiny else args.sampling_steps
    max_steps = args.steps if args.steps is not None else 2 if args.tiny else None
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                date=time.strftime("%Y-%m-%d"), samples=samples, sampler=f"DPM-Solver++(2M) {sampling_steps} steps",
                guidance=args.guidance, minutes_per_model=args.minutes, steps_per_model=args.steps,
                features="random (tiny)" if args.tiny else "FID Inception-v3 pool3, float16 weights")
    if not args.models:
        return dict(meta=meta, rows=write_report(out, meta))

    train_images, train_labels = core.decode_split(Path(args.data) / "train_jpeg.npz", 48 if args.tiny else None)
    test_images, test_labels = core.decode_split(Path(args.data) / "test_jpeg.npz", 16 if args.tiny else None)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    test_images, test_labels = test_images.to(device), test_labels.to(device)
    extractor = fid.TinyFeatures().to(device) if args.tiny else fid.load_inception(args.inception, device)
    reference_feats = fid.features(extractor, train_images)
    reference = fid.statistics(reference_feats)
    meta.update(train_reference_images=len(train_images), test_images=len(test_images))
    core.log(f"{len(train_images)} train / {len(test_images)} test images; reference features {tuple(reference_feats.shape)}")

    teacher = core.load_model(args.teacher, device).eval().requires_grad_(False)
    sample_labels = torch.arange(samples, device=device) % core.NUM_CLASSES

    def draw(model):
        return core.sample(model, sample_labels, seed=args.seed, steps=sampling_steps, guidance=args.guidance)

    teacher_samples = []  # (images, statistics) of the teacher, made once when a model needs them
    teacher_file = out / "teacher_samples.pt"  # the teacher's process shares its samples with the others
    sampling = dict(seed=args.seed, steps=sampling_steps, guidance=args.guidance,
                    teacher=hashlib.sha256((Path(args.teacher) / "model.safetensors").read_bytes()).hexdigest())

    def teacher_images() -> torch.Tensor:
        if teacher_file.exists():
            saved = torch.load(teacher_file, map_location=device)
            if saved["sampling"] == sampling and torch.equal(saved["labels"], sample_labels):
                return saved["images"]
        return draw(teacher)

    def measure(name: str, model: nn.Module, train: dict | None) -> None:
        model.eval()
        row = dict(model=name, heldout_loss=core.heldout_loss(model, test_images, test_labels))
        images = draw(model)
        if name == "teacher":
            temporary = teacher_file.with_name(f".{teacher_file.name}.{os.getpid()}")
            torch.save(dict(images=images, labels=sample_labels, sampling=sampling), temporary)
            temporary.replace(teacher_file)
        feats = fid.features(extractor, images)
        stats = fid.statistics(feats)
        row["fid"] = fid.frechet_distance(stats, reference)
        row["kid"] = fid.kernel_inception_distance(feats, reference_feats)
        if name != "teacher":
            if not teacher_samples:
                reference_images = teacher_images()
                teacher_samples.extend((reference_images, fid.statistics(fid.features(extractor, reference_images))))
            row["fid_vs_teacher"] = fid.frechet_distance(stats, teacher_samples[1])
            row["psnr_vs_teacher"] = fid.paired_psnr(images, teacher_samples[0])
        if train is not None:
            row["train"] = train
        (out / "rows" / f"{name.replace(':', '_')}.json").write_text(json.dumps(row, indent=1))
        core.log(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))

    for name in args.models:
        if name == "teacher":
            measure("teacher", teacher, None)
            continue
        if name == "control":
            model, params = make_control(teacher)
            adapter, recipe = None, CONTROL
        else:
            model, adapter, params = make_student(teacher)
            recipe = RECIPES[name]
            name = f"student:{name}"
        model.train()
        summary = distill(model, teacher, params, recipe, train_images, train_labels, args.minutes * 60, batch,
                          args.seed, adapter=adapter, max_steps=max_steps)
        measure(name, model, summary)
        del model, adapter
    return dict(meta=meta, rows=write_report(out, meta))


if __name__ == "__main__":
    main()
