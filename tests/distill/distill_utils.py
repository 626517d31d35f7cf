"""Helpers of the distillation tests: a tiny image folder, in-process runs, reading what a run wrote."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import torch

TINY_RUN = ["--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--fidelity_timesteps", "1",
            "--checkpointing_steps", "100", "--seed", "0"]


def make_image_folder(root: Path, count: int = 6, caption_column: str | None = "text") -> Path:
    """``count`` random RGB images of several sizes and aspect ratios, with metadata.jsonl."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        height, width = 64 + 16 * (index % 3), 96 - 8 * (index % 4)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"{index}.png")
        entry = {"file_name": f"{index}.png"}
        if caption_column:
            entry[caption_column] = f"a test picture number {index}"
        lines.append(json.dumps(entry))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; in-process runs start from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


BENCH_DISTILL = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distill.py"


def run_distill(output_dir: Path, *flags: str, model: Path | None = None, data: Path | None = None, main=None):
    """distill_sdxl.main (or ``main``, e.g. ``bench_distill_main()``) in this process, on TINY_RUN's flags."""
    if main is None:
        from gspn_diffusers.distill.distill_sdxl import main

    argv = ["--output_dir", str(output_dir), *TINY_RUN]
    if model is not None:
        argv += ["--pretrained_model_name_or_path", str(model)]
    if data is not None:
        argv += ["--train_data_dir", str(data)]
    argv += list(flags)  # later flags win over TINY_RUN's
    reset_accelerate()
    try:
        return main(argv)
    finally:
        reset_accelerate()


def bench_distill_main():
    return runpy.run_path(str(BENCH_DISTILL))["main"]


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines() if line]


def adapter_state(folder: Path) -> dict[str, torch.Tensor]:
    from gspn_diffusers import GSPNAdapter

    return {k: v.clone() for k, v in GSPNAdapter.from_pretrained(folder).state_dict().items()}


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
