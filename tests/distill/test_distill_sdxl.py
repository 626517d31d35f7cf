"""distill/distill_sdxl.py on the tiny SDXL (CPU, one process): resume, kills, export, losses, data sources."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from distill_utils import (
    TINY_RUN, adapter_state, bench_distill_main, make_image_folder, max_abs_difference, read_log, reset_accelerate,
    run_distill,
)

from gspn_diffusers import GSPNAdapter
from gspn_diffusers.distill import checkpoints
from gspn_diffusers.distill.data import StreamBatchSampler
from gspn_diffusers.testing import TINY_TEXT_HIDDEN

# Warm-up 4 steps: a resume at step 3 that lost the scheduler state would train step 4 at another rate.
RESUME_RUN = ["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4", "--checkpointing_steps", "3"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_sdxl_path, images):
    """5 steps in one go (checkpoints at 3 and 5): the reference of the resume tests."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_distill(out, *RESUME_RUN, "--max_train_steps", "5", model=tiny_sdxl_path, data=images)
    return out


def assert_same_steps(log_a, log_b, steps):
    by_step_a = {r["step"]: r for r in log_a}
    by_step_b = {r["step"]: r for r in log_b}
    for step in steps:
        a, b = by_step_a[step], by_step_b[step]
        for key in ("loss", "noise_loss", "kd_loss", "feature_loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (step, key)
        assert a["layer_feature_loss"] == pytest.approx(b["layer_feature_loss"], rel=1e-6, abs=1e-9)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path, tiny_sdxl_path, images, uninterrupted, capsys):
    out = tmp_path / "resumed"
    run_distill(out, *RESUME_RUN, "--max_train_steps", "3", model=tiny_sdxl_path, data=images)
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == ["checkpoint-3"]
    after_three = adapter_state(out / "gspn")
    capsys.readouterr()
    run_distill(out, *RESUME_RUN, "--max_train_steps", "5", "--resume_from_checkpoint", "latest",
                model=tiny_sdxl_path, data=images)
    assert "Resumed from" in capsys.readouterr().out

    log, reference = read_log(out), read_log(uninterrupted)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert_same_steps(log, reference, [1, 2, 3, 4, 5])
    assert log[3]["lr"] == pytest.approx(1e-3) and log[2]["lr"] == pytest.approx(0.75e-3)  # warm-up carried on
    final, expected = adapter_state(out / "gspn"), adapter_state(uninterrupted / "gspn")
    assert max_abs_difference(final, expected) < 1e-6
    assert max_abs_difference(final, after_three) > 1e-5  # steps 4-5 did train


@pytest.mark.parametrize("kill_in", ["save_state", "export"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_usable(
    tmp_path, monkeypatch, tiny_sdxl_path, images, uninterrupted, kill_in
):
    out = tmp_path / "killed"

    class Killed(BaseException):
        pass

    if kill_in == "save_state":
        original = Accelerator.save_state

        def save_state(self, output_dir=None, **kwargs):
            result = original(self, output_dir, **kwargs)  # the files are written, then the process dies
            if "checkpoint-5" in str(output_dir):
                raise Killed()
            return result

        monkeypatch.setattr(Accelerator, "save_state", save_state)
    else:
        original = GSPNAdapter.save_pretrained

        def save_pretrained(self, folder, *args, **kwargs):
            if "checkpoint-5" in str(folder):
                (folder / "config.json").parent.mkdir(parents=True, exist_ok=True)
                (folder / "config.json").write_text("{")  # half-written, then the process dies
                raise Killed()
            return original(self, folder, *args, **kwargs)

        monkeypatch.setattr(GSPNAdapter, "save_pretrained", save_pretrained)

    with pytest.raises(Killed):
        run_distill(out, *RESUME_RUN, "--max_train_steps", "5", model=tiny_sdxl_path, data=images)
    monkeypatch.undo()
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == ["checkpoint-3"]
    assert not (out / "checkpoint-5").exists() and (out / ".checkpoint-5.tmp").exists()
    assert checkpoints.read_state(out / "checkpoint-3")["global_step"] == 3
    published = adapter_state(out / "gspn")  # still the complete step-3 export
    assert max_abs_difference(published, adapter_state(out / "checkpoint-3" / "gspn")) == 0

    run_distill(out, *RESUME_RUN, "--max_train_steps", "5", "--resume_from_checkpoint", "latest",
                model=tiny_sdxl_path, data=images)
    assert not (out / ".checkpoint-5.tmp").exists()
    assert_same_steps(read_log(out), read_log(uninterrupted), [4, 5])
    assert max_abs_difference(adapter_state(out / "gspn"), adapter_state(uninterrupted / "gspn")) < 1e-6


def test_exported_adapter_mounts_on_a_fresh_unet_with_its_fidelity_report(tiny_sdxl_path, uninterrupted):
    adapter = GSPNAdapter.from_pretrained(uninterrupted / "gspn")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet").eval()
    initial = GSPNAdapter.for_unet(unet).state_dict()
    assert max_abs_difference(adapter.state_dict(), initial) > 1e-4  # trained, not the init
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        sample=torch.randn(1, 4, 16, 24, generator=g), timestep=torch.tensor(300),
        encoder_hidden_states=torch.randn(1, 77, 2 * TINY_TEXT_HIDDEN, generator=g),
        added_cond_kwargs=dict(text_embeds=torch.randn(1, TINY_TEXT_HIDDEN, generator=g),
                               time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]])),
    )
    with torch.no_grad():
        teacher = unet(**inputs).sample
        with adapter.mounted(unet):
            student = unet(**inputs).sample
    assert torch.isfinite(student).all() and not torch.allclose(student, teacher, atol=1e-4)

    report = json.loads((uninterrupted / "gspn" / "fidelity_report.json").read_text())
    assert report["step"] == 5 and set(report["layers"]) == set(adapter.config.layers)
    for scores in report["layers"].values():
        assert 0 <= scores["relative_l2"] < 2 and -1 <= scores["cosine"] <= 1
        assert len(scores["relative_l2_per_timestep"]) == len(report["timesteps"])


def test_feature_loss_falls_over_30_steps(tmp_path, tiny_sdxl_path, images, capsys):
    out = tmp_path / "thirty"
    run_distill(out, "--max_train_steps", "30", "--train_batch_size", "1", "--learning_rate", "3e-3",
                "--fidelity_timesteps", "3", "--checkpointing_steps", "30", model=tiny_sdxl_path, data=images)
    losses = [r["feature_loss"] for r in read_log(out)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses
    table = capsys.readouterr().out
    assert "rel L2" in table and "mid_block.attentions.0.transformer_blocks.1.attn1" in table


def test_gradient_checkpointing_trains_the_same(tmp_path, tiny_sdxl_path, images):
    plain = run_distill(tmp_path / "plain", "--max_train_steps", "2", model=tiny_sdxl_path, data=images)
    checkpointed = run_distill(tmp_path / "ckpt", "--max_train_steps", "2", "--gradient_checkpointing",
                               model=tiny_sdxl_path, data=images)
    assert_same_steps(read_log(tmp_path / "plain"), read_log(tmp_path / "ckpt"), [1, 2])
    assert max_abs_difference(adapter_state(plain), adapter_state(checkpointed)) < 1e-6


def test_gradient_accumulation_equals_the_same_global_batch(tmp_path, tiny_sdxl_path, images):
    whole = run_distill(tmp_path / "whole", "--max_train_steps", "3", model=tiny_sdxl_path, data=images)
    accumulated = run_distill(tmp_path / "acc", "--max_train_steps", "3", "--train_batch_size", "1",
                              "--gradient_accumulation_steps", "2", model=tiny_sdxl_path, data=images)
    for a, b in zip(read_log(tmp_path / "whole"), read_log(tmp_path / "acc")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert max_abs_difference(adapter_state(whole), adapter_state(accumulated)) < 1e-5


def test_layerwise_stage_then_end_to_end(tmp_path, tiny_sdxl_path, images):
    run_distill(tmp_path / "layerwise", "--max_train_steps", "3", "--layerwise_steps", "2", "--learning_rate", "0",
                model=tiny_sdxl_path, data=images)
    run_distill(tmp_path / "e2e", "--max_train_steps", "1", "--learning_rate", "0", model=tiny_sdxl_path, data=images)
    log, e2e = read_log(tmp_path / "layerwise"), read_log(tmp_path / "e2e")
    assert [r["stage"] for r in log] == ["layerwise", "layerwise", "end_to_end"]
    assert log[0]["noise_loss"] == 0 and log[0]["kd_loss"] == 0 and log[2]["noise_loss"] > 0
    # The first GSPN layer sees the same tokens in both stages (nothing before it differs), so its
    # layerwise loss equals its end-to-end feature loss on the same batch; later layers see the
    # student's upstream errors end to end, so theirs differ.
    assert log[0]["layer_feature_loss"][0] == pytest.approx(e2e[0]["layer_feature_loss"][0], rel=1e-5)
    assert log[0]["layer_feature_loss"][-1] != pytest.approx(e2e[0]["layer_feature_loss"][-1], rel=1e-3)


def test_prompts_file_needs_no_images_and_random_sdxl_benchmark(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse at dawn\n\na red bicycle\nmountains in fog\n")
    bench = tmp_path / "bench.json"
    run_distill(tmp_path / "prompts", "--random_sdxl", "tiny", "--prompts_file", str(prompts),
                "--teacher_sampling_steps", "2", "--max_train_steps", "6", "--train_batch_size", "1",
                "--benchmark_json", str(bench), main=bench_distill_main())
    out = tmp_path / "prompts" / "gspn"
    log = read_log(tmp_path / "prompts")
    assert len(log) == 6 and all(r["noise_loss"] > 0 and r["kd_loss"] > 0 for r in log)
    assert (out / "fidelity_report.json").exists() and GSPNAdapter.from_pretrained(out).config.layers
    result = json.loads(bench.read_text())
    assert result["steps_run"] == 6 and result["seconds_per_step"] > 0 and result["num_processes"] == 1
    assert set(result["feature_loss_first_step"]["per_layer"]) == set(result["layers"])
    assert result["feature_loss_last_step"]["step"] == 6 and result["fidelity_end"]["cosine"] <= 1


def test_dataset_name_reads_a_datasets_image_folder(tmp_path, tiny_sdxl_path):
    pytest.importorskip("datasets")
    data = make_image_folder(tmp_path / "hub_like", count=4)
    run_distill(tmp_path / "ds", "--dataset_name", str(data), "--max_train_steps", "2", model=tiny_sdxl_path)
    assert len(read_log(tmp_path / "ds")) == 2


def test_validation_images_and_checkpoint_limit(tmp_path, tiny_sdxl_path, images):
    out = tmp_path / "val"
    run_distill(out, "--max_train_steps", "4", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                "--validation_prompt", "a cat", "--validation_steps", "2", "--num_validation_images", "1",
                "--validation_inference_steps", "2", model=tiny_sdxl_path, data=images)
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == ["checkpoint-3", "checkpoint-4"]
    assert (out / "validation" / "step-2" / "student-0.png").exists()
    assert (out / "validation" / "step-2" / "teacher-0.png").exists()
    assert (out / "validation" / "step-4" / "student-0.png").exists()
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_data_order_is_the_same_for_any_split_and_any_start():
    one = StreamBatchSampler(10, batch_size=4, rank=0, world_size=1, seed=3)
    halves = [StreamBatchSampler(10, batch_size=2, rank=r, world_size=2, seed=3) for r in range(2)]
    late = StreamBatchSampler(10, batch_size=4, rank=0, world_size=1, seed=3, start_micro_batch=2)
    it_one, it_halves, it_late = iter(one), [iter(h) for h in halves], iter(late)
    seen = [next(it_one) for _ in range(5)]
    for batch in seen:
        assert batch == next(it_halves[0]) + next(it_halves[1])
    assert [next(it_late) for _ in range(3)] == seen[2:]
    positions = [p for batch in seen for _, p in batch]
    assert positions == list(range(20))
    epoch_one = sorted([i for batch in seen[:2] for i, _ in batch] + [i for i, _ in seen[2][:2]])
    assert epoch_one == list(range(10))  # every sample once per epoch


def test_random_full_size_sdxl_is_sdxl_shaped():
    from gspn_diffusers.adapter import self_attention_layers
    from gspn_diffusers.distill.models import random_sdxl, sdxl_shape_from_configs

    parts = random_sdxl("full", "meta", torch.bfloat16)  # the architecture only: no memory, no time
    assert sum(p.numel() for p in parts.unet.parameters()) > 2.5e9 and parts.unet.dtype == torch.bfloat16
    assert parts.vae.dtype == torch.float32 and len(self_attention_layers(parts.unet)) == 70
    shape = sdxl_shape_from_configs("full", dict(parts.unet.config), dict(parts.vae.config),
                                    parts.text_encoder.config.to_dict(), parts.text_encoder_2.config.to_dict())
    assert shape.vae_scale_factor == 8 and shape.latent_channels == 4
    ids = parts.tokenizer_2(["a lighthouse"]).input_ids[0]
    assert max(ids) < parts.text_encoder_2.config.vocab_size and ids[-1] == parts.text_encoder_2.config.eos_token_id


def test_leftovers_of_a_killed_save_are_tidied(tmp_path):
    for name in (".checkpoint-4.tmp", ".gspn.tmp", ".gspn.old", ".checkpoint-2.old", "checkpoint-2"):
        (tmp_path / name).mkdir()
    (tmp_path / ".gspn.old" / "config.json").write_text("{}")  # killed between moving gspn aside and renaming
    checkpoints.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "gspn"]
    assert (tmp_path / "gspn" / "config.json").exists()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noise_loss_target_follows_the_prediction_type(prediction_type):
    from diffusers import DDPMScheduler

    from gspn_diffusers.distill.losses import prediction_target

    scheduler = DDPMScheduler(prediction_type=prediction_type)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    target = prediction_target(scheduler, latents, noise, t)
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "v_prediction": alpha * noise - sigma * latents, "sample": latents}[prediction_type]
    torch.testing.assert_close(target, expected)


def test_feature_loss_is_relative_and_per_sample():
    from gspn_diffusers.distill.losses import relative_feature_loss

    teacher = torch.stack([torch.ones(3, 4), 100 * torch.ones(3, 4)])
    student = teacher * 1.1  # 10% off in both samples, whatever their scale
    torch.testing.assert_close(relative_feature_loss(student, teacher), torch.tensor([0.01, 0.01]))


def test_training_callbacks_see_every_step_and_can_stop_the_run(tmp_path, tiny_sdxl_path, images):
    from gspn_diffusers.distill.args import parse_args
    from gspn_diffusers.distill.distill_sdxl import setup

    class StopAtTwo:
        def __init__(self):
            self.calls = []

        def on_train_begin(self, distiller, step):
            self.calls.append(("begin", step))

        def on_step_end(self, distiller, record):
            self.calls.append(("step", record["step"]))
            return record["step"] == 2

        def on_train_end(self, distiller, step):
            self.calls.append(("end", step))

    out = tmp_path / "stopped"
    callback = StopAtTwo()
    reset_accelerate()
    try:
        distiller, resume = setup(parse_args([
            "--output_dir", str(out), "--pretrained_model_name_or_path", str(tiny_sdxl_path), "--train_data_dir",
            str(images), *TINY_RUN, "--max_train_steps", "5", "--fidelity_timesteps", "0"]))
        assert resume is None and distiller.train(resume, callbacks=[callback]) == 2
        distiller.accelerator.end_training()
    finally:
        reset_accelerate()
    assert callback.calls == [("begin", 0), ("step", 1), ("step", 2), ("end", 2)]
    assert [r["step"] for r in read_log(out)] == [1, 2]
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == ["checkpoint-2"]  # the last step is saved
    assert (out / "gspn" / "config.json").exists()


def test_benchmark_flags_are_not_part_of_the_distillation(capsys):
    from gspn_diffusers.distill.args import parse_args

    for flag, value in (("--benchmark_json", "b.json"), ("--max_train_seconds", "10")):
        with pytest.raises(SystemExit):
            parse_args(["--random_sdxl", "tiny", flag, value])
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
