"""benchmarks/compare.py's n_sweep part (issue 13's grid) without a GPU: the loop, the OOM skip,
the iteration schedule, results.json, the verdicts and their counts in results.md, and the plot.

The timing functions are replaced by a fake timer whose times and memory are functions of the
method and N, so every verdict below is known in advance; the methods themselves run for real on
the CPU (tiny shapes), through the same measure_fused as on the GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import compare  # noqa: E402

HV = [(8, 24, "small"), (16, 40, "large")]
NS = [4, 8, 16]


def floor_ms(N):
    return 4.0 * N  # 16, 32, 64 ms: the last point is over LONG_STEP_MS (50)


# Each method's fake fwd+bwd time as a multiple of the floor, and its transient MiB, per N.
TIME = {
    "fusedce": lambda N: 2.0 if N == 4 else 1.1,  # slower than compile and eager at the smallest N
    "torch.compile": lambda N: 1.2,
    "torch eager": lambda N: 1.5,
    "liger": lambda N: 1.3,
}
MEM = {
    "fusedce": lambda N: 10.0,
    "torch.compile": lambda N: 5.0 if N == 4 else 100.0,  # less memory than fusedce at N = 4 only
    "torch eager": lambda N: 300.0,
    "liger": lambda N: 20.0,
}


class Fake:
    """Methods that note each call, and the three timing functions of compare.py, faked."""

    def __init__(self):
        self.calls = []  # (method, N) of every call
        self.timer = []  # (method, N, warmup, iters) of every cuda_time_ms call
        self.floors = []

    def method(self, name):
        def fn(x, w, t):
            N = x.shape[0]
            self.calls.append((name, N))
            if name == "torch eager" and N >= 8:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (fake)")
            if name == "liger" and N == 8:
                raise RuntimeError("a failure that is no OOM (fake)")
            return F.cross_entropy(F.linear(x, w).float(), t)

        return fn

    def cuda_time_ms(self, fn, warmup=3, iters=10):
        fn()
        name, N = self.calls[-1]
        self.timer.append((name, N, warmup, iters))
        return TIME[name](N) * floor_ms(N)

    def transient_bytes(self, step, grad_bytes):
        step()
        name, N = self.calls[-1]
        return int(MEM[name](N) * compare.MIB)

    def gemm_floor_ms(self, N, H, V, dtype, fwd=True, schedule=None):
        assert not fwd and schedule is compare.grid_schedule
        self.floors.append((N, H, V))
        return {"floor_ms": floor_ms(N), "tflops": 1.0}


@pytest.fixture
def grid(monkeypatch, tmp_path):
    fake = Fake()
    monkeypatch.setattr(compare, "cuda_time_ms", fake.cuda_time_ms)
    monkeypatch.setattr(compare, "transient_bytes", fake.transient_bytes)
    monkeypatch.setattr(compare, "gemm_floor_ms", fake.gemm_floor_ms)
    methods = {name: fake.method(name) for name in TIME}
    methods["cut-cross-entropy"] = compare._skipped(ImportError("not installed (fake)"))
    records, saves, shapes_done, lines = [], [], [], []
    path = str(tmp_path / "results.json")
    meta = {"device": "fake device", "date": "today", "quick": False,
            "versions": {"torch": torch.__version__}}

    def save():
        compare.write_results(path, meta, records)
        saves.append(len(records))

    compare.n_grid(methods, records, save, hv=HV, ns=NS, dtype=torch.float32, device="cpu",
                   on_shape_done=lambda: shapes_done.append(len(records)), progress=lines.append)
    return dict(fake=fake, records=records, saves=saves, shapes_done=shapes_done, lines=lines,
                path=path, meta=meta, out_dir=str(tmp_path))


def _rec(records, method, H, N):
    (r,) = [r for r in records if (r["method"], r["H"], r["N"]) == (method, H, N)]
    return r


def test_every_method_at_every_point_with_errors_recorded(grid):
    records, fake = grid["records"], grid["fake"]
    # 4 importable methods x 3 N x 2 shapes; the unimportable peer leaves no record.
    assert len(records) == 24
    assert not [r for r in records if r["method"] == "cut-cross-entropy"]
    assert all(r["group"] == "n_grid" and r["part"] == "n_sweep" for r in records)
    for H, V, _ in HV:
        f = _rec(records, "fusedce", H, 4)
        assert f["status"] == "ok" and f["fwdbwd_ms"] == pytest.approx(2.0 * 16)
        assert f["ratio"] == pytest.approx(2.0) and f["transient_mib"] == pytest.approx(10.0)
        assert "fwd_ms" not in f  # fwd+bwd only in the grid
        eager8 = _rec(records, "torch eager", H, 8)
        assert eager8["status"] == "failed" and eager8["oom"] and "OutOfMemoryError" in eager8["error"]
        eager16 = _rec(records, "torch eager", H, 16)
        assert eager16["status"] == "skipped" and eager16["error"] == "skipped: OOM at smaller N (N=8)"
        # A failure that is no OOM does not skip the larger N.
        liger8 = _rec(records, "liger", H, 8)
        assert liger8["status"] == "failed" and not liger8["oom"]
        assert _rec(records, "liger", H, 16)["status"] == "ok"
    # The skipped method was not called at the larger N of either shape.
    assert ("torch eager", 16) not in fake.calls
    assert fake.floors == [(N, H, V) for H, V, _ in HV for N in NS]


def test_fewer_timed_steps_where_the_floor_is_long(grid):
    for name, N, warmup, iters in grid["fake"].timer:
        assert (warmup, iters) == ((2, 5) if floor_ms(N) > compare.LONG_STEP_MS else (3, 10)), (name, N)
    assert {r["iters"] for r in grid["records"] if r["N"] == 16} == {5}
    assert {r["iters"] for r in grid["records"] if r["N"] < 16} == {10}


def test_saved_after_every_record_and_each_shape(grid):
    assert grid["saves"] == list(range(1, 25))
    assert grid["shapes_done"] == [12, 24]
    # One head line per point and one line per record, each with the elapsed time.
    assert len(grid["lines"]) == 6 + 24 and all(line.startswith("[+") for line in grid["lines"])


def test_verdicts_in_the_json(grid):
    with open(grid["path"]) as f:
        data = json.load(f)
    assert len(data["records"]) == 24
    v = data["n_sweep_verdicts"]
    assert v["n_points"] == 6
    assert v["counts"]["time_vs_compile"] == {"yes": 4, "no": 2}
    assert v["counts"]["memory_vs_compile"] == {"yes": 4, "no": 2}
    assert v["counts"]["time_and_memory_vs_compile"] == {"yes": 4, "no": 2}
    assert v["counts"]["time_vs_eager"] == {"no": 2, "torch eager OOM": 2, "torch eager skipped after OOM": 2}
    p4 = [p for p in v["points"] if p["N"] == 4]
    assert [p["fusedce_ms"] for p in p4] == [pytest.approx(32.0)] * 2
    assert all(p["time_vs_compile"] == "no" and p["time_vs_eager"] == "no" for p in p4)


def test_verdict_without_fusedce_or_peer():
    ok = {"status": "ok", "fwdbwd_ms": 1.0, "transient_mib": 1.0}
    oom = {"status": "failed", "oom": True}
    assert compare._verdict(ok, "torch.compile", None, "fwdbwd_ms") == "torch.compile not run"
    assert compare._verdict(oom, "torch.compile", ok, "fwdbwd_ms") == "fusedce OOM"
    assert compare._verdict(ok, "torch.compile", dict(ok, fwdbwd_ms=1.0), "fwdbwd_ms") == "yes"
    assert compare._verdict(ok, "torch.compile", dict(ok, fwdbwd_ms=0.9), "fwdbwd_ms") == "no"


def test_markdown_table_and_counts(grid):
    md = compare.markdown(grid["meta"], grid["records"])
    assert "fusedce time <= torch.compile's at 4 of 6 points (no at 2)" in md
    assert "fusedce transient memory <= torch.compile's at 4 of 6 points (no at 2)" in md
    assert ("fusedce time <= torch eager's at 0 of 6 points (no at 2; no verdict: torch eager OOM: 2, "
            "torch eager skipped after OOM: 2)") in md
    assert "### small: H=8, V=24" in md and "### large: H=16, V=40" in md
    header = [line for line in md.splitlines() if line.startswith("| N | floor ms | fusedce ms |")]
    assert len(header) == 2
    assert "fusedce | torch.compile | torch eager | liger" in header[0]
    # N = 4 of the first shape: floor 16 ms, fusedce 32 ms = 2x, compile 1.2x, eager 1.5x,
    # liger 1.3x; memory 10 vs 5 MiB; fusedce loses all three verdicts there.
    assert "| 4 | 16.000 | 32.000 | 2.000 | 1.200 | 1.500 | 1.300 | 10.0 | 5.0 | **no** | **no** | **no** |" in md
    assert "| 16 | 64.000 | 70.400 | 1.100 | 1.200 | skipped (OOM at smaller N) | 1.300 | 10.0 | 100.0 | yes | yes | torch eager skipped after OOM |" in md
    assert "- liger at N=8 H=8 V=24: RuntimeError: a failure that is no OOM (fake)" in md
    # The grid stays out of the table of the shape runs, which has no rows here, so no section.
    assert "x8x24 |" not in md and "## Fused linear cross entropy" not in md


def test_plot_or_clean_skip(grid, capsys):
    paths = compare.draw_plots(grid["path"], grid["out_dir"])
    if importlib.util.find_spec("matplotlib") is None:
        assert paths == []
        assert "no plots here" in capsys.readouterr().out
    else:
        png = os.path.join(grid["out_dir"], "n_sweep_ratio_vs_n.png")
        assert png in paths and os.path.getsize(png) > 0


def test_compiled_peer_is_one_graph_per_shape(monkeypatch):
    """torch.compile in the grid: dynamic in N, static in H and V (aot_eager: no C++ build here)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    methods = compare.make_n_grid_methods()
    assert {"fusedce", "fusedce low-memory", "torch eager", "torch.compile"} <= set(methods)
    before = compare._dynamo_graphs()
    for H, V, _ in HV:
        for N in NS:
            x = torch.randn(N, H, requires_grad=True)
            w = torch.randn(V, H, requires_grad=True)
            t = torch.randint(0, V, (N,))
            loss = methods["torch.compile"](x, w, t)
            loss.backward()
            ref = compare._eager(x.detach(), w.detach(), t)
            torch.testing.assert_close(loss.detach(), ref)
    assert compare._dynamo_graphs() - before == len(HV)
    torch._dynamo.reset()


def test_help_without_cuda():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "compare", "--help"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert "n_sweep" in out.stdout and "65536" in out.stdout


def test_run_only_n_sweep_keeps_the_other_parts(monkeypatch, tmp_path):
    """run(only="n_sweep") end to end (CUDA faked away): earlier parts' records stay, an earlier
    grid is replaced, results.md has the grid's section."""
    fake = Fake()
    monkeypatch.setattr(compare, "cuda_time_ms", fake.cuda_time_ms)
    monkeypatch.setattr(compare, "transient_bytes", fake.transient_bytes)
    monkeypatch.setattr(compare, "gemm_floor_ms", fake.gemm_floor_ms)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake device")
    monkeypatch.setattr(compare, "make_n_grid_methods", lambda methods_filter=None: {n: fake.method(n) for n in TIME})
    monkeypatch.setattr(compare, "n_grid", functools.partial(compare.n_grid, hv=HV[:1], device="cpu", dtype=torch.float32))
    monkeypatch.setattr(compare, "N_GRID", NS)
    path = tmp_path / "results.json"
    earlier = {"meta": {"date": "earlier"}, "records": [
        {"kind": "ce", "part": "ce", "method": "fusedce", "N": 1, "V": 2, "status": "failed", "error": "x"},
        {"kind": "fused", "part": "n_sweep", "group": "n_grid", "method": "stale", "N": 1, "H": 1, "V": 1,
         "status": "failed", "error": "stale"},
    ]}
    path.write_text(json.dumps(earlier))
    compare.run(str(tmp_path), only="n_sweep")
    data = json.loads(path.read_text())
    assert [r["part"] for r in data["records"]].count("ce") == 1
    assert not [r for r in data["records"] if r["method"] == "stale"]
    assert len([r for r in data["records"] if r.get("group") == "n_grid"]) == 4 * len(NS)
    assert data["n_sweep_verdicts"]["n_points"] == len(NS)
    md = (tmp_path / "results.md").read_text()
    assert "fusedce time <= torch.compile's at 2 of 3 points (no at 1)" in md
