"""benchmarks/bench_vae.py runs on the CPU (tiny VAE) and reports every variant against the current decode."""

import json
import runpy
from pathlib import Path


def test_vae_benchmark_smoke_runs_on_cpu(tmp_path, capsys):
    bench = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "bench_vae.py"))
    out = tmp_path / "vae.json"
    bench["main"](["--tiny", "--sizes", "192", "256", "--variants", "channels-last", "--top", "1",
                   "--plain-repeats", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    small = {c["variant"]: c for c in results["tiled"] if c["size"] == 192}
    # which variants the attention and tile ones build on depends on the times: only their suffixes are fixed
    attention = sorted(name for name in small if name.endswith(("+sdpa", "+matmul")))
    larger = sorted(name for name in small if ", tile " in name)
    same_tiles = ["current", "channels-last", *attention]
    assert [n.rsplit("+", 1)[1] for n in attention] == ["matmul", "sdpa"]
    assert [n.split(", ")[1] for n in larger] == ["tile 192", "tile 256"]
    assert set(small) == {*same_tiles, *larger, "untiled"}
    # same tiles, float32: the tuned decodes are the current one up to rounding; other tiles are not
    for name in same_tiles[1:]:
        assert small[name]["tiles"] == 4 and small[name]["max_diff"] < 1e-4, small[name]
    assert small[larger[1]]["tiles"] == 1 and small["untiled"]["max_diff"] > 1e-3
    assert [c["variant"] for c in results["tiled"] if c["size"] == 256][0] == "current"
    assert len([c for c in results["tiled"] if c["size"] == 256]) == 2
    methods = {c["method"] for c in results["attention"] if "error" not in c}
    assert {"sdpa (default)", "matmul, float32 scores"} <= methods
    assert all(c["max_err"] < 1e-5 for c in results["attention"] if "error" not in c)
    assert "all tiled decodes" in capsys.readouterr().out
