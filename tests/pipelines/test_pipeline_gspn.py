"""The optional ``gspn`` component: mounted on load, saved as its own subfolder, brought back by from_pretrained."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gspn_diffusers import GSPNAdapter, GSPNStableDiffusionXLPipeline
from gspn_diffusers.processor import GSPN2AttnProcessor

PROMPT = "a lighthouse at dawn"


def _load(path, **kwargs):
    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


def _gspn_processors(pipe):
    return [p for p in pipe.unet.attn_processors.values() if isinstance(p, GSPN2AttnProcessor)]


@pytest.fixture(scope="module")
def adapter(tiny_sdxl_path):
    stock = _load(tiny_sdxl_path)
    torch.manual_seed(0)
    adapter = GSPNAdapter.for_unet(stock.unet)
    with torch.no_grad():  # move away from the teacher-initialised head so a lost adapter shows
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return adapter


def test_stock_folder_loads_without_gspn_and_saves_without_it(tiny_sdxl_path, tmp_path):
    pipe = _load(tiny_sdxl_path)
    assert pipe.gspn is None and not _gspn_processors(pipe)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["gspn"] == [None, None]
    assert not (tmp_path / "gspn").exists()
    assert _load(tmp_path).gspn is None


def test_stock_folder_with_gspn_passed_mounts_it(tiny_sdxl_path, adapter):
    pipe = _load(tiny_sdxl_path, gspn=adapter)
    try:
        assert pipe.gspn is adapter and adapter.is_mounted
        assert len(_gspn_processors(pipe)) == len(adapter.config.layers)
    finally:
        adapter.unmount(pipe.unet)


def test_save_and_load_brings_the_adapter_back(tiny_sdxl_path, adapter, tmp_path):
    pipe = _load(tiny_sdxl_path, gspn=adapter)
    try:
        before = _generate(pipe, height=512, width=384, tile_size=256)
        pipe.save_pretrained(tmp_path)
        assert adapter.is_mounted  # saving unmounts only for the duration of the save
    finally:
        adapter.unmount(pipe.unet)

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["gspn"][1] == "GSPNAdapter" and index["gspn"][0].startswith("gspn_diffusers")
    assert (tmp_path / "gspn" / "config.json").exists()
    unet_keys = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert not [k for k in unet_keys if ".processor." in k]  # the UNet is saved stock

    loaded = _load(tmp_path)
    assert isinstance(loaded.gspn, GSPNAdapter) and loaded.gspn.is_mounted
    assert len(_gspn_processors(loaded)) == len(adapter.config.layers)
    for name, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.gspn.state_dict()[name], tensor), name
    after = _generate(loaded, height=512, width=384, tile_size=256)
    assert np.array_equal(before, after)


def test_gspn_changes_the_image(tiny_sdxl_path, adapter):
    stock = _generate(_load(tiny_sdxl_path))
    pipe = _load(tiny_sdxl_path, gspn=adapter)
    try:
        assert not np.allclose(_generate(pipe, stage_attention="gspn"), stock)  # auto: softmax at the base size
    finally:
        adapter.unmount(pipe.unet)


def test_the_pipeline_is_exported_lazily():
    import gspn_diffusers

    assert "GSPNStableDiffusionXLPipeline" in dir(gspn_diffusers)
    assert gspn_diffusers.GSPNStableDiffusionXLPipeline is GSPNStableDiffusionXLPipeline
