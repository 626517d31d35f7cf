"""A plain (non-editable) install carries the whole library: pipelines, distill, CUDA sources, configs."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
    )
    (path,) = out.glob("gspn_diffusers-*.whl")
    return path


def test_wheel_holds_every_part(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in ROOT.glob("pipelines/*.py"):
        assert f"gspn_diffusers/pipelines/{source.name}" in names
    for source in ROOT.glob("distill/*.py"):
        assert f"gspn_diffusers/distill/{source.name}" in names
    for pattern in ("*.cu", "*.cuh", "*.cpp", "*.h"):
        for source in ROOT.glob(f"csrc/{pattern}"):
            assert f"gspn_diffusers/csrc/{source.name}" in names
    assert "gspn_diffusers/configs/sdxl_unet.json" in names
    assert "gspn_diffusers/ops/reference.py" in names


def test_installed_wheel_imports_without_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import gspn_diffusers, gspn_diffusers.pipelines, gspn_diffusers.distill;"
        "assert gspn_diffusers.__file__.startswith(sys.argv[1]), gspn_diffusers.__file__;"
        "from gspn_diffusers import gspn_propagate; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
