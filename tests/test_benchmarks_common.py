"""The benchmark helpers and runner: medians, ratios, the JSON line, discovery, child processes, and a tiny
``--quick`` run of the HDF5 benchmark. Nothing here asserts on timings."""

from __future__ import annotations

import io
import json
import math

import pytest

from benchmarks import __main__ as runner
from benchmarks import common


def test_median_and_ratio() -> None:
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.median([4, 1, 2, 3]) == 2.5
    assert math.isnan(common.median([]))
    assert common.ratio(3.0, 2.0) == 1.5
    assert math.isnan(common.ratio(1.0, 0.0))
    assert math.isnan(common.ratio(float("nan"), 1.0))
    assert common.rate(10, 2.0) == 5.0
    assert math.isnan(common.rate(10, 0.0))


def test_time_repeats_counts_calls() -> None:
    calls = []
    samples = common.time_repeats(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(samples) == 3 and len(calls) == 5
    assert all(s >= 0 for s in samples)
    s = common.summarize([1.0, 3.0, 2.0])
    assert s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["n"] == 3


def test_json_line_is_one_line_bench_first_and_nan_is_null() -> None:
    line = common.json_line({"figures": {"a": float("nan"), "b": [1.0, float("inf")]}, "bench": "x"})
    assert "\n" not in line
    assert line.startswith('{"bench":"x"')
    assert json.loads(line) == {"bench": "x", "figures": {"a": None, "b": [1.0, None]}}


def test_emit_prints_json_then_summary() -> None:
    buf = io.StringIO()
    result = {"bench": "demo", "figures": {"r": 1.5}, "machine": {"cpu": "X", "cores": 2}, "command": "cmd"}
    assert common.emit(result, ["ratio 1.50x"], stream=buf) is result
    lines = buf.getvalue().splitlines()
    assert json.loads(lines[0])["figures"] == {"r": 1.5}
    assert lines[1] == "== demo =="
    assert "ratio 1.50x" in lines[2]
    assert any("reproduce: cmd" in ln for ln in lines)


def test_runner_discovers_every_bench_module() -> None:
    names = runner.discover()
    assert {"extract", "memory", "hdf5"} <= set(names)
    chosen, rest = runner.split_args(["bench_hdf5", "extract", "--quick", "x"], names)
    assert chosen == ["hdf5", "extract"] and rest == ["--quick", "x"]
    assert runner.split_args(["--quick"], names) == (names, ["--quick"])
    with pytest.raises(SystemExit):
        runner.split_args(["nope"], names)


def test_run_child_returns_last_json_line_and_peak_rss() -> None:
    res = common.run_child("print('noise'); print(json.dumps({'x': ARGS['x'] * 2}))", {"x": 21})
    assert res["x"] == 42
    assert res["max_rss_mb"] > 1
    with pytest.raises(RuntimeError, match="failed"):
        common.run_child("raise SystemExit(3)", {})


def test_machine_info_names_cpu_and_torch() -> None:
    info = common.machine_info()
    assert info["cpu"] and info["cores"] >= 1 and "torch" in info


def test_photo_jpegs_are_an_image_folder(tmp_path) -> None:
    from PIL import Image

    root = common.make_photo_jpegs(tmp_path / "p", 5, size=(60, 40), classes=2, vary=False)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 5 and {f.parent.name for f in files} == {"class_0", "class_1"}
    assert Image.open(files[0]).size == (60, 40)


def test_hdf5_quick_run(tmp_path, capsys) -> None:
    from benchmarks import bench_hdf5

    result = bench_hdf5.main(["--quick", "--rows", "1024", "--dim", "64", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[0])["bench"] == "hdf5"
    f = result["figures"]["cache_float16"]
    assert f["write_mb_s"] > 0 and 0 <= f["random_read_share"] <= 1


def test_tools_growth_exponent_is_the_log_log_slope() -> None:
    """`python -m benchmarks tools` reports how cost grows with the rows: 1 linear, 2 quadratic."""
    from benchmarks.bench_tools import slope

    rows = [10_000, 30_000, 100_000]
    assert slope(rows, [r * 1e-3 for r in rows]) == pytest.approx(1.0)
    assert slope(rows, [(r / 1e4) ** 2 for r in rows]) == pytest.approx(2.0)
    assert slope(rows, [5.0, 5.0, 5.0]) == pytest.approx(0.0)
    assert slope([10_000], [1.0]) != slope([10_000], [1.0])  # NaN: one size gives no exponent


def test_the_gpu_benchmark_without_cuda_says_so_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m benchmarks gpu` on a machine without a CUDA device measures nothing: a clear message,
    exit code 2, and the runner reports it as not run rather than crashing."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run")
    from benchmarks import bench_gpu

    with pytest.raises(SystemExit) as exc:
        bench_gpu.main(["--minutes", "0.1"])
    assert exc.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert runner.main(["gpu", "--minutes", "0.1"]) == 1
    assert "failed: gpu" in capsys.readouterr().err
