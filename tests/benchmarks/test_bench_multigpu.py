"""benchmarks/bench_multigpu.py on the CPU with the tiny SDXL: the JSON and the table carry each stage's attention."""

import json
import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_multigpu.py"


def test_tiny_run_records_the_attention_of_each_stage(tmp_path, capsys):
    bench = runpy.run_path(str(SCRIPT))
    bench["main"](["--tiny", "--sizes", "512", "--steps", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "multigpu_1gpu.json").read_text())
    (run,) = report["runs"]
    assert [(s["stage"], s["attention"]) for s in run["stages"]] == [(0, "softmax"), (1, "gspn"), ("decode", None)]
    assert "0 softmax" in capsys.readouterr().out

    bench["main"](["--table", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert "attention" in lines[0] and lines[1].split()[:2] == ["512", "1"]
    assert lines[1].split()[5] == "sg" and lines[-1] == "attention of each stage: s softmax, g GSPN"
