"""Bad input is refused before training, by name (distill/distill_sdxl.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from distill_utils import make_image_folder, run_distill

import gspn_diffusers.distill.distill_sdxl as script
from gspn_diffusers.distill import checkpoints
from gspn_diffusers.distill.data import DistillInputError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def not_sdxl(tmp_path_factory, tiny_sdxl_path):
    """The tiny pipeline with an SD 1.5-style UNet config (no text-time conditioning)."""
    folder = tmp_path_factory.mktemp("not_sdxl")
    for part in tiny_sdxl_path.iterdir():
        if part.is_dir():
            shutil.copytree(part, folder / part.name)
        else:
            shutil.copy(part, folder / part.name)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(addition_embed_type=None, projection_class_embeddings_input_dim=None)
    config_path.write_text(json.dumps(config))
    return folder


def refused(tmp_path, *flags, model=None, data=None) -> str:
    out = tmp_path / "out"
    with pytest.raises(DistillInputError) as error:
        run_distill(out, "--max_train_steps", "2", *flags, model=model, data=data)
    assert not out.exists(), "refused input must stop the run before it writes anything"
    return str(error.value)


def test_missing_data_folder(tmp_path, tiny_sdxl_path):
    message = refused(tmp_path, model=tiny_sdxl_path, data=tmp_path / "nowhere")
    assert "--train_data_dir" in message and "nowhere" in message and "does not exist" in message


def test_data_folder_without_metadata(tmp_path, tiny_sdxl_path, images):
    bare = tmp_path / "bare"
    shutil.copytree(images, bare)
    (bare / "metadata.jsonl").unlink()
    message = refused(tmp_path, model=tiny_sdxl_path, data=bare)
    assert "metadata.jsonl" in message and "--train_data_dir" in message


def test_metadata_without_captions(tmp_path, tiny_sdxl_path):
    data = make_image_folder(tmp_path / "uncaptioned", caption_column=None)
    message = refused(tmp_path, model=tiny_sdxl_path, data=data)
    assert "metadata.jsonl, line 1" in message and 'no caption in column "text"' in message


def test_metadata_with_captions_under_another_column(tmp_path, tiny_sdxl_path):
    data = make_image_folder(tmp_path / "other_column", caption_column="prompt")
    message = refused(tmp_path, model=tiny_sdxl_path, data=data)
    assert "--caption_column" in message
    run_distill(tmp_path / "ok", "--max_train_steps", "1", "--caption_column", "prompt", "--fidelity_timesteps", "0",
                model=tiny_sdxl_path, data=data)  # and accepted once named


def test_model_that_is_not_sdxl_shaped(tmp_path, not_sdxl, images):
    message = refused(tmp_path, model=not_sdxl, data=images)
    assert "is not an SDXL-shaped model" in message and "addition_embed_type" in message and str(not_sdxl) in message


def test_model_folder_that_is_not_a_pipeline(tmp_path, images):
    (tmp_path / "empty_model").mkdir()
    message = refused(tmp_path, model=tmp_path / "empty_model", data=images)
    assert "is not an SDXL-shaped model" in message and "empty_model" in message


def test_resolution_not_a_multiple_of_the_vae_factor(tmp_path, tiny_sdxl_path, images):
    message = refused(tmp_path, "--resolution", "60", model=tiny_sdxl_path, data=images)
    assert "--resolution 60 is not a multiple of the VAE factor 8" in message


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], "no training data"),
        (["--prompts_file", "missing.txt"], "--prompts_file 'missing.txt' does not exist"),
        (["--resume_from_checkpoint", "checkpoint-7"], "--resume_from_checkpoint 'checkpoint-7'"),
        (["--layerwise_steps", "5"], "--layerwise_steps (5)"),
        (["--report_to", "nosuchtracker"], "--report_to nosuchtracker"),
    ],
)
def test_other_bad_flags(tmp_path, tiny_sdxl_path, images, flags, expected):
    data = None if not flags or flags[0] == "--prompts_file" else images
    assert expected in refused(tmp_path, *flags, model=tiny_sdxl_path, data=data)


def test_command_line_prints_the_refusal(tmp_path, tiny_sdxl_path):
    result = subprocess.run(
        [sys.executable, script.__file__, "--pretrained_model_name_or_path", str(tiny_sdxl_path),
         "--train_data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "distill_sdxl.py: error: --train_data_dir" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- flag values (argparse)

@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--learning_rate", "-1"], "argument --learning_rate: must be >= 0, got -1"),
        (["--lr_scheduler", "bogus"], "argument --lr_scheduler: invalid choice: 'bogus'"),
        (["--train_batch_size", "0"], "argument --train_batch_size: must be >= 1, got 0"),
        (["--resolution", "big"], "argument --resolution: expected an integer, got 'big'"),
        (["--adam_beta2", "1"], "argument --adam_beta2: must be >= 0 and < 1, got 1"),
        (["--adam_epsilon", "0"], "argument --adam_epsilon: must be > 0, got 0"),
        (["--max_grad_norm", "nan"], "argument --max_grad_norm: must be > 0, got nan"),
        (["--chunk_size", "-4"], "argument --chunk_size: must be >= 1, got -4"),
        (["--lr_warmup_steps", "-1"], "argument --lr_warmup_steps: must be >= 0, got -1"),
    ],
)
def test_bad_flag_values_are_argparse_errors(flags, expected, capsys):
    from gspn_diffusers.distill.args import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--random_sdxl", "tiny", *flags])
    assert exit_.value.code == 2 and expected in capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    from gspn_diffusers.distill.args import build_parser

    text = " ".join(build_parser().format_help().split())
    for shown in ("AdamW learning rate of the GSPN parameters (default: 0.001)", "(default: constant)", "--resolution RESOLUTION",
                  "square training size in pixels (default: 1024)", "--seed SEED", "(default: 0)"):
        assert shown in text, shown


def test_command_line_prints_a_bad_value_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, script.__file__, "--random_sdxl", "tiny", "--learning_rate", "-1",
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: argument --learning_rate: must be >= 0, got -1" in result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------- output_dir and resume settings

def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_sdxl_path, images):
    """A 2-step run with a checkpoint at step 2, and a file of the user's beside it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    out.mkdir()
    (out / "prompts.txt").write_text("mine\n")
    run_distill(out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--fidelity_timesteps", "0",
                model=tiny_sdxl_path, data=images)
    return out


def test_a_new_run_into_a_run_folder_is_refused_and_nothing_is_lost(finished_run, tiny_sdxl_path, images):
    before = snapshot(finished_run)
    with pytest.raises(DistillInputError) as error:
        run_distill(finished_run, "--max_train_steps", "1", model=tiny_sdxl_path, data=images)
    message = str(error.value)
    assert f"--output_dir {finished_run} holds a run" in message and "train_log.jsonl" in message
    assert "checkpoint-2" in message and "--overwrite_output_dir" in message and "--resume_from_checkpoint" in message
    assert snapshot(finished_run) == before


def test_resume_latest_without_a_checkpoint_is_refused(tmp_path, tiny_sdxl_path, images):
    out = tmp_path / "killed_early"
    out.mkdir()
    (out / "train_log.jsonl").write_text('{"step": 1}\n')  # a run killed before its first checkpoint
    with pytest.raises(DistillInputError, match="has no complete checkpoint to resume from"):
        run_distill(out, "--max_train_steps", "1", "--resume_from_checkpoint", "latest", model=tiny_sdxl_path,
                    data=images)
    assert (out / "train_log.jsonl").read_text() == '{"step": 1}\n'


def test_overwrite_output_dir_starts_anew_and_keeps_files_that_are_not_the_run(tmp_path, finished_run, tiny_sdxl_path,
                                                                               images):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    (out / ".checkpoint-4.tmp").mkdir()  # a killed save of the old run
    run_distill(out, "--max_train_steps", "1", "--checkpointing_steps", "1", "--fidelity_timesteps", "0",
                "--overwrite_output_dir", model=tiny_sdxl_path, data=images)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "gspn", "prompts.txt", "train_log.jsonl"]
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1]
    assert (out / "prompts.txt").read_text() == "mine\n"


def test_overwrite_output_dir_and_resume_together_are_refused(tmp_path, tiny_sdxl_path, images):
    message = refused(tmp_path, "--overwrite_output_dir", "--resume_from_checkpoint", "latest", model=tiny_sdxl_path,
                      data=images)
    assert "--overwrite_output_dir" in message and "--resume_from_checkpoint" in message


def test_resume_with_other_run_settings_is_refused_naming_each(finished_run, tiny_sdxl_path, images):
    before = snapshot(finished_run)
    with pytest.raises(DistillInputError) as error:
        run_distill(finished_run, "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                    "--train_batch_size", "1", "--seed", "5", "--feature_loss_weight", "0.5", "--resolution", "32",
                    model=tiny_sdxl_path, data=images)
    lines = str(error.value).splitlines()
    assert "checkpoint-2" in lines[0] and "other settings" in lines[0]
    assert sorted(line.strip() for line in lines[1:]) == [
        "--feature_loss_weight 1.0 -> 0.5", "--resolution 64 -> 32", "--seed 0 -> 5", "--train_batch_size 2 -> 1",
    ]
    assert snapshot(finished_run) == before


def test_resume_with_other_processes_is_refused(tmp_path, finished_run, tiny_sdxl_path, images):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    state_file = out / "checkpoint-2" / "training_state.json"
    state = json.loads(state_file.read_text())
    state["settings"]["num_processes"] = 2
    state_file.write_text(json.dumps(state))
    with pytest.raises(DistillInputError, match="processes 2 -> 1"):
        run_distill(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", model=tiny_sdxl_path,
                    data=images)


def test_resume_may_change_steps_checkpointing_and_reporting(tmp_path, finished_run, tiny_sdxl_path, images):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    run_distill(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--checkpointing_steps", "5",
                "--checkpoints_total_limit", "1", "--fidelity_timesteps", "1", "--dataloader_num_workers", "0",
                model=tiny_sdxl_path, data=images)
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert checkpoints.read_state(out / "checkpoint-3")["settings"]["train_batch_size"] == 2
