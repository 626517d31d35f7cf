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
    assert [s.get("attention") for s in written["stages"]] == ["softmax", "gspn", None]  # auto
    assert written["stage_attention"] == "auto"
    assert PIL.Image.open(tmp_path / "gspn_384x512.png").size == (384, 512)
    assert "The image is NOISE" in capsys.readouterr().out


def test_softmax_plan_only_for_several_sizes(generate_16k, tmp_path, capsys):
    assert generate_16k.main(["--tiny", "--softmax", "--plan-only", "--sizes", "1024", "768x512",
                              "--out", str(tmp_path)]) == [{}, {}]
    out = capsys.readouterr().out
    assert "softmax attention" in out and "1024x1024" in out and "768x512" in out
    assert not list(tmp_path.iterdir())


def test_stage_attention_per_stage_reaches_the_plan_the_json_and_the_table(generate_16k, tmp_path, capsys):
    (report,) = generate_16k.main(["--tiny", "--height", "512", "--width", "384", "--steps", "2", "--no-save-image",
                                   "--stage-attention", "gspn,softmax", "--out", str(tmp_path)])
    assert [s.get("attention") for s in report["stages"]] == ["gspn", "softmax", None]
    assert report["stage_attention"] == ["gspn", "softmax"]
    out = capsys.readouterr().out
    table = out[out.index("attention  tiles"):].splitlines()
    assert table[1].split()[:4] == ["0", "224x288", "2", "gspn"] and table[2].split()[:4] == ["1", "384x512", "1",
                                                                                             "softmax"]


def test_several_sizes_without_images(generate_16k, tmp_path):
    reports = generate_16k.main(["--tiny", "--sizes", "256", "384x256", "--steps", "1", "--no-save-image",
                                 "--out", str(tmp_path)])
    assert [(r["width"], r["height"]) for r in reports] == [(256, 256), (384, 256)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gspn_256x256.json", "gspn_384x256.json"]


@pytest.mark.parametrize("argv,message", [
    (["--tiny", "--height", "700"], "height must be a positive multiple of 8"),
    (["--tiny", "--sizes", "3000x2000x1"], "size must be N or WxH"),
    (["--model", "/nonexistent", "--device", "cpu", "--allow-slow-cpu"], "--model /nonexistent"),
    (["--tiny", "--steps", "0"], "--steps must be at least 1"),
    (["--tiny", "--stage-attention", "flash"], "must be auto, gspn, softmax or a comma list"),
    (["--tiny", "--softmax", "--stage-attention", "gspn"], "no GSPN adapter"),
    (["--tiny", "--height", "512", "--stage-attention", "gspn,gspn,gspn"], "stage_attention has 3 values"),
])
def test_user_errors_are_one_line_without_traceback(generate_16k, tmp_path, capsys, argv, message):
    try:
        status = generate_16k.cli(argv + ["--out", str(tmp_path)])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2 and message in err.strip().splitlines()[-1]  # argparse's usage comes first
    assert "Traceback" not in err


def test_full_size_on_cpu_is_refused_unless_asked(generate_16k, tmp_path, capsys, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(generate_16k, "build_pipeline", no_build)
    assert generate_16k.cli(["--device", "cpu", "--height", "4096", "--width", "4096", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "no GPU" in captured.out and "--allow-slow-cpu" in captured.err and "min on this CPU" in captured.err
    with pytest.raises(AssertionError, match="built"):  # asked: it goes on to build the model
        generate_16k.cli(["--device", "cpu", "--height", "4096", "--allow-slow-cpu", "--out", str(tmp_path)])


def test_tiny_run_has_no_float32_modules_warning(generate_16k, tmp_path, capsys):
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        generate_16k.main(["--tiny", "--plan-only", "--height", "256", "--width", "256", "--out", str(tmp_path)])
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r for r in records if "should be kept in float32" in r.getMessage()]
