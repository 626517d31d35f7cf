"""Bad input is refused before training, by name (distill/distill_sdxl.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from distill_utils import make_image_folder, run_distill

import gspn_diffusers.distill.distill_sdxl as script
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
