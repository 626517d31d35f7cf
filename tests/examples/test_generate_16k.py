"""examples/generate_16k.py runs end to end on CPU with the tiny SDXL and writes its image and timings."""

import importlib.util
import json
from pathlib import Path

import PIL.Image
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "generate_16k.py"


@pytest.fixture(scope="module")
def generate_16k():
    spec = importlib.util.spec_from_file_location("generate_16k", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_the_image_and_per_stage_timings(generate_16k, tmp_path, capsys):
    (report,) = generate_16k.main(["--tiny", "--height", "512", "--width", "384", "--steps", "2",
                                   "--vae-tile-size", "128", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "gspn_384x512.json").read_text())
    assert written["stages"] == json.loads(json.dumps(report["stages"]))
    assert [s["stage"] for s in written["stages"]] == [0, 1, "decode"]
    assert all(s["seconds"] > 0 for s in written["stages"]) and written["total_seconds"] > 0
    assert written["attention"] == "gspn" and written["weights"].startswith("random")
    assert PIL.Image.open(tmp_path / "gspn_384x512.png").size == (384, 512)
    assert "The image is NOISE" in capsys.readouterr().out


def test_softmax_plan_only_for_several_sizes(generate_16k, tmp_path, capsys):
    assert generate_16k.main(["--tiny", "--softmax", "--plan-only", "--sizes", "1024", "768x512",
                              "--out", str(tmp_path)]) == [{}, {}]
    out = capsys.readouterr().out
    assert "softmax attention" in out and "1024x1024" in out and "768x512" in out
    assert not list(tmp_path.iterdir())


def test_several_sizes_without_images(generate_16k, tmp_path):
    reports = generate_16k.main(["--tiny", "--sizes", "256", "384x256", "--steps", "1", "--no-save-image",
                                 "--out", str(tmp_path)])
    assert [(r["width"], r["height"]) for r in reports] == [(256, 256), (384, 256)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gspn_256x256.json", "gspn_384x256.json"]
