"""Two CPU processes through `accelerate launch` (gloo DDP) agree with one process.

"Agree": with the global batch fixed (2 processes x 1 sample vs 1 process x 1 sample x 2 accumulation
steps -- the recipe for the GPU comparison too), every step sees the same samples, noise and timesteps,
so the logged losses match to float rounding and the exported adapters match: what training changed
differs by under 0.1% (compare_adapters' relative L2 of the training change; measured here about 3e-6).
A run with another global batch (1 x 1) is far outside that (about 0.5), so the check can fail.
"""

from __future__ import annotations

import json

import pytest
from distill_utils import BENCH_DISTILL, TINY_RUN, make_image_folder, read_log, run_distill

from gspn_diffusers.distill import checkpoints, compare_adapters

RUN = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--learning_rate", "3e-3"]


def test_two_processes_agree_with_one(tmp_path, tiny_sdxl_path, launch_two_processes):
    images = make_image_folder(tmp_path / "images")
    two = tmp_path / "two"
    result = launch_two_processes(
        tmp_path, BENCH_DISTILL, "--pretrained_model_name_or_path", str(tiny_sdxl_path), "--train_data_dir", str(images),
        "--output_dir", str(two), *TINY_RUN, *RUN, "--train_batch_size", "1", "--ddp_timeout", "120",
        "--validation_prompt", "a cat", "--validation_steps", "2", "--num_validation_images", "1",
        "--validation_inference_steps", "2", "--benchmark_json", str(tmp_path / "bench.json"),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "2 process(es)" in result.stdout
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (two / "checkpoint-2").iterdir()}
    assert (two / "validation" / "step-2" / "student-0.png").exists()

    one = run_distill(tmp_path / "one", *RUN, "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                      model=tiny_sdxl_path, data=images)
    other_batch = run_distill(tmp_path / "other", *RUN, "--train_batch_size", "1", model=tiny_sdxl_path, data=images)

    log_two, log_one = read_log(two), read_log(tmp_path / "one")
    assert [r["step"] for r in log_two] == [1, 2, 3]
    for a, b in zip(log_two, log_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["layer_feature_loss"] == pytest.approx(b["layer_feature_loss"], rel=1e-4)

    initial = str(two / "gspn-initial")  # written by bench_distill.py
    same = compare_adapters.main([str(one), str(two / "gspn"), "--initial", initial, "--tolerance", "1e-3"])
    assert same["training_change_l2"] > 1e-3
    different = compare_adapters.compare(*(compare_adapters._state(str(f)) for f in (one, other_batch, initial)))
    assert different["relative_l2_of_training_change"] > 1e-2
    with pytest.raises(SystemExit):
        compare_adapters.main([str(one), str(other_batch), "--initial", initial, "--tolerance", "1e-3"])

    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["num_processes"] == 2 and len(bench["peak_memory_gib_per_process"]) == 2
    assert checkpoints.read_state(two / "checkpoint-3")["num_processes"] == 2
