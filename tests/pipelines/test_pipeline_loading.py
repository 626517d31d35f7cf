"""A folder saved by GSPNStableDiffusionXLPipeline loads in a fresh interpreter, by either entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gspn_diffusers import GSPNAdapter, GSPNStableDiffusionXLPipeline


@pytest.fixture(scope="module")
def saved_with_adapter(tmp_path_factory, tiny_sdxl_path):
    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    adapter = GSPNAdapter.for_unet(pipe.unet, proxy_ratio=4)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(0.01)  # not the initialisation: the load must bring back these weights
    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, gspn=adapter)
    folder = tmp_path_factory.mktemp("saved_gspn_pipeline")
    pipe.save_pretrained(folder)
    return folder, adapter


def run_fresh(load: str, check: str, tmp_path) -> subprocess.CompletedProcess:
    code = textwrap.dedent(load) + textwrap.dedent(check)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)


CHECK = """
    import torch
    from gspn_diffusers.adapter import GSPNAdapter
    assert type(pipe).__name__ == "GSPNStableDiffusionXLPipeline", type(pipe)
    assert isinstance(pipe.gspn, GSPNAdapter) and pipe.gspn.is_mounted
    expected = GSPNAdapter.from_pretrained({gspn!r}).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in pipe.gspn.state_dict().items())
    print("LOADED", pipe.gspn.config.proxy_ratio)
"""


def test_gspn_pipeline_loads_in_a_fresh_interpreter(saved_with_adapter, tmp_path):
    folder, _ = saved_with_adapter
    result = run_fresh(f"""
        from gspn_diffusers import GSPNStableDiffusionXLPipeline
        pipe = GSPNStableDiffusionXLPipeline.from_pretrained({str(folder)!r})
    """, CHECK.format(gspn=str(folder / "gspn")), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED 4" in result.stdout


def test_diffusion_pipeline_loads_it_with_the_custom_pipeline_entry(saved_with_adapter, tmp_path):
    folder, _ = saved_with_adapter
    result = run_fresh(f"""
        from diffusers import DiffusionPipeline
        import gspn_diffusers.custom_pipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, custom_pipeline=gspn_diffusers.custom_pipeline.__file__,
                                                 trust_remote_code=True)
        import gspn_diffusers
        assert type(pipe) is gspn_diffusers.GSPNStableDiffusionXLPipeline  # the installed class, not a copy
    """, CHECK.format(gspn=str(folder / "gspn")), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED 4" in result.stdout
