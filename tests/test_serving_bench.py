"""The benchmark's machinery on the floor model alone (short windows): rows, summary, report files."""

from __future__ import annotations

import json

import pytest

from bench import served


def test_perf_analyzer_runs_with_the_bundled_libraries():
    # tritonclient[all] ships the binary; it needs libb64.so.0d and libcudart.so.12 from nvidia_pytriton.libs.
    assert served.perf_analyzer_bin() is not None, "perf_analyzer not installed (tritonclient[all]==2.51.0)"
    assert served.perf_analyzer_works()


@pytest.mark.server
def test_bench_smoke_writes_tables_and_plot(tmp_path):
    s = served.Settings(concurrency=(1, 4), protocols=("grpc", "http"), window_ms=500, max_trials=3,
                       inprocess_s=0.3, tool="python", frontdoor_requests=20)
    res = served.run([], s, tmp_path, log=lambda m: None)
    rows = res["rows"]
    combos = {(r.runtime, r.protocol, r.batching, r.concurrency) for r in rows}
    assert combos == {("torch", "in-process", "-", 1), ("torch", "in-process", "-", 4),
                      ("onnxruntime", "in-process", "-", 1), ("onnxruntime", "in-process", "-", 4),
                      *{("triton", p, b, c) for p in ("grpc", "http") for b in ("on", "off") for c in (1, 4)}}
    assert all(r.model == "passthrough" and r.p50_ms > 0 and r.p50_ms <= r.p99_ms and r.throughput > 0 for r in rows)
    # The batcher is really off in the "off" rows (config override), and merges requests in the "on" ones.
    assert all(r.avg_server_batch == 1.0 for r in rows if r.batching == "off")
    assert set(res["summary"]["floor_ms"]) == {"grpc/on", "grpc/off", "http/on", "http/off"}
    md = (tmp_path / "bench.md").read_text()
    assert "**Floor**" in md and "| passthrough | triton | grpc | off | 4 |" in md
    assert "## Front door" in md and "| passthrough | JSON" in md and "| passthrough | binary" in md
    door = res["meta"]["frontdoor"]
    assert [r["binary"] for r in door] == [False, True]
    assert all(0 < r[k]["p50"] <= r[k]["p99"] for r in door for k in ("grpc", "direct", "frontdoor"))
    assert json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert (tmp_path / "bench.png").stat().st_size > 10_000


@pytest.mark.server
def test_perf_analyzer_run_keeps_the_load_generator_off_the_server_cores(tmp_path):
    """On a multi-core host the server (and the in-process references) get all cores but the first, which
    perf_analyzer gets; the caller's own affinity is restored afterwards."""
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one usable core: nothing to split")
    before = os.sched_getaffinity(0)
    s = served.Settings(concurrency=(1,), protocols=("grpc",), window_ms=500, max_trials=3, inprocess_s=0.3,
                       tool="perf_analyzer")
    res = served.run([], s, tmp_path, log=lambda m: None)
    server_cpus, client_cpus = served.split_cores()
    assert res["meta"]["pinning"] == (f"server and in-process references on CPU {','.join(map(str, server_cpus))}, "
                                      f"perf_analyzer on CPU {','.join(map(str, client_cpus))}")
    assert any(r.tool == "perf_analyzer" for r in res["rows"] if r.runtime == "triton")
    assert os.sched_getaffinity(0) == before
    assert "CPU pinning: server and in-process references on CPU" in (tmp_path / "bench.md").read_text()


def test_served_variants_never_picks_a_variant_that_missed_its_gate():
    from bench import variants_served as vb

    gates = {"fp32": {"passed": True}, "int8": {"passed": False}, "fp16": {"passed": True}}
    # fp16 is not served on CPU, and a variant Triton does not serve is not timed.
    assert vb.served_variants("m", gates, {"m", "m_int8", "m_fp16"}) == {"fp32": "m", "int8": "m_int8"}
    assert vb.served_variants("m", gates, {"m"}) == {"fp32": "m"}
    timings = {"fp32": {"rps": 100.0}, "int8": {"rps": 300.0}}
    assert vb.best(gates, timings) == "fp32"  # int8 is faster, but missed its gate
    assert vb.best({**gates, "int8": {"passed": True}}, timings) == "int8"
    assert vb.best({"fp32": {"passed": False}}, {"fp32": {"rps": 1.0}}) is None
