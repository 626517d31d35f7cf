"""Train the quality benchmark's teacher: a class-conditional pixel-space UNet on CIFAR-10 (epsilon
objective, label dropout 10% for guidance, bf16 autocast, AdamW, EMA), for a fixed wall-clock budget;
the learning rate warms up, then follows a cosine to zero over the budget.

    python3 -m benchmarks.quality.train_teacher --data .carry/train --out $OUT/teacher --minutes 5
    python3 -m benchmarks.quality.train_teacher --data .carry/train --init .carry/teacher --out $OUT/teacher

Writes <out>/model.safetensors (the EMA weights, float16), <out>/config.json and <out>/train_log.json.
``--init`` continues from such a folder (a wall-clock budget per GPU call): its weights start both the
model and the EMA, the optimizer starts afresh, and the log counts the steps of every run so far.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.quality import core
from gspn_diffusers.distill.losses import per_sample_mse, prediction_target


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder holding train_jpeg.npz")
    parser.add_argument("--out", required=True)
    parser.add_argument("--init", help="a folder this script wrote: continue from its weights")
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.9995)
    parser.add_argument("--label_dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny model, 64 images, CPU, a few steps (tests)")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    config = core.TINY_CONFIG if args.tiny else core.TEACHER_CONFIG
    batch = 8 if args.tiny else args.batch

    started = time.time()
    images, labels = core.decode_split(Path(args.data) / "train_jpeg.npz", 64 if args.tiny else None)
    images, labels = images.to(device), labels.to(device)
    core.log(f"decoded {len(images)} train images in {time.time() - started:.1f} s")

    if args.init:
        model = core.load_model(args.init, device)
        config = json.loads((Path(args.init) / "config.json").read_text())
        history = json.loads((Path(args.init) / "train_log.json").read_text())
        runs = history.get("runs", [dict(steps=history["steps"], seconds=history["seconds"], batch=history["batch"])])
    else:
        model, runs = core.ClassConditionedUNet(config).to(device), []
    ema = core.EMA(model, args.ema)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    scheduler = core.noise_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    core.log(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters on {device}")

    budget_s = args.minutes * 60
    step, losses, began = 0, [], time.time()
    while time.time() - began < budget_s and not (args.tiny and step >= 3):
        index = torch.randint(0, len(images), (batch,), device=device)
        x0 = core.to_model_space(core.random_flip(images[index]))
        y = torch.where(torch.rand(batch, device=device) < args.label_dropout, core.UNCONDITIONAL, labels[index])
        noise = torch.randn_like(x0)
        t = torch.randint(0, core.TRAIN_TIMESTEPS, (batch,), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        progress = (time.time() - began) / budget_s
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1)))
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            prediction = model(xt, t, y)
        loss = per_sample_mse(prediction, prediction_target(scheduler, x0, noise, t)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)
        step += 1
        if step % 100 == 0:
            losses.append((step, round(time.time() - began, 1), loss.item()))
            if step % 500 == 0:
                core.log(f"step {step}  loss {loss.item():.4f}  {step / (time.time() - began):.1f} steps/s")
    elapsed = time.time() - began
    ema.copy_to(model)
    out = core.save_model(model, args.out, config)
    runs.append(dict(steps=step, seconds=round(elapsed, 1), batch=batch))
    (out / "train_log.json").write_text(json.dumps(dict(
        steps=sum(r["steps"] for r in runs), batch=batch, seconds=round(sum(r["seconds"] for r in runs), 1),
        runs=runs, lr=args.lr, ema=args.ema, device=str(device),
        gpu=torch.cuda.get_device_name() if device.type == "cuda" else None, loss_curve=losses,
        parameters=sum(p.numel() for p in model.parameters())), indent=1))
    core.log(f"trained {step} steps in {elapsed:.0f} s; saved {out}")
    return out


if __name__ == "__main__":
    main()
