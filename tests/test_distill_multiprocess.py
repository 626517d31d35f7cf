"""Two CPU processes through `accelerate launch` (gloo DDP) agree with one process.

"Agree": with the global batch fixed (2 processes x 1 sample vs 1 process x 2 samples), every step sees
the same samples, noise and timesteps, so the logged losses match to float rounding and the exported
adapters match: their change from the initial adapter differs by under 0.1% (relative L2 over all
weights). A run with another global batch (1 x 1) is far outside that, so the check can fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from distill_utils import TINY_RUN, adapter_state, make_image_folder, read_log, run_distill

import gspn_diffusers.distill.distill_sdxl as script
from gspn_diffusers import GSPNAdapter
from gspn_diffusers.distill import checkpoints

RUN = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--learning_rate", "3e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(tmp_path: Path, *script_args: str) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).parent / "accelerate"
    prefix = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = prefix + [
        "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        script.__file__, *script_args,
    ]
    if prefix[-1] == "accelerate.commands.launch":
        command.remove("launch")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def delta_mismatch(a: dict, b: dict, initial: dict) -> float:
    """||(a - initial) - (b - initial)|| / ||a - initial|| over all weights."""
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in a) ** 0.5
    den = sum(((a[k] - initial[k]).double() ** 2).sum() for k in a) ** 0.5
    return float(num / den)


def test_two_processes_agree_with_one(tmp_path, tiny_sdxl_path):
    images = make_image_folder(tmp_path / "images")
    two = tmp_path / "two"
    result = accelerate_launch(
        tmp_path, "--pretrained_model_name_or_path", str(tiny_sdxl_path), "--train_data_dir", str(images),
        "--output_dir", str(two), *TINY_RUN, *RUN, "--train_batch_size", "1", "--ddp_timeout", "120",
        "--validation_prompt", "a cat", "--validation_steps", "2", "--num_validation_images", "1",
        "--validation_inference_steps", "2",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "2 process(es)" in result.stdout
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (two / "checkpoint-2").iterdir()}
    assert (two / "validation" / "step-2" / "student-0.png").exists()

    one = run_distill(tmp_path / "one", *RUN, model=tiny_sdxl_path, data=images)  # 1 process x 2 samples
    other_batch = run_distill(tmp_path / "other", *RUN, "--train_batch_size", "1", model=tiny_sdxl_path, data=images)

    log_two, log_one = read_log(two), read_log(tmp_path / "one")
    assert [r["step"] for r in log_two] == [1, 2, 3]
    for a, b in zip(log_two, log_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["layer_feature_loss"] == pytest.approx(b["layer_feature_loss"], rel=1e-4)

    # the initial adapter: the teacher-initialised one of the same UNet
    initial = GSPNAdapter.for_unet(UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")).state_dict()
    trained_two, trained_one = adapter_state(two / "gspn"), adapter_state(one)
    assert delta_mismatch(trained_one, trained_two, initial) < 1e-3
    assert delta_mismatch(trained_one, adapter_state(other_batch), initial) > 1e-2
    assert all(torch.isfinite(v).all() for v in trained_two.values())
    assert checkpoints.read_state(two / "checkpoint-3")["num_processes"] == 2
