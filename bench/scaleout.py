"""What Envoy costs and what replicas give, measured side by side in one run: ``reports/scaleout.{md,json}``.

Clients only ever talk to a front door (``serving.stack.front_door``, HTTP + gRPC, in a process of its own as in
``make serve``); what differs is what is behind it:

- **Added latency at concurrency 1**: the same real test images sent one at a time, alternating request by
  request between a front door in front of Envoy (2 private replicas behind it) and an identical front door in
  front of one of those replicas directly (its unix socket), over gRPC and over HTTP: p50/p95/p99.
- **Throughput at concurrency 16** (gRPC): the same two paths, in alternating rounds.
- **Faults**: a replica SIGKILLed, then a python stub, under load through Envoy with and without its retry policy.

Also the closed-loop ``Load`` the scale-out tests drive: client threads sending real inputs through a front door,
every answer compared with onnxruntime's on the exported graph.

    python -m bench.scaleout [cnn] [--duration 4] [--rounds 3] [--requests 300]
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_parser
from export.markdown import md_table, with_host_line
from export.timing import percentiles
from serving.cli import cli_error

PROTOCOLS = ("grpc", "http")


# ------------------------------------------------------------------------------------------------ load


@dataclass
class Case:
    feeds: dict[str, np.ndarray]
    ref: dict[str, np.ndarray]


def reference_cases(model: str, n: int = 16, batch: int = 1, repo: Path | None = None, seed: int = 0) -> list[Case]:
    """``n`` requests of real test images, each with onnxruntime's answer on the exported graph of ``model``."""
    from bench.common import example_inputs
    from export.runners import OnnxRuntimeRunner
    from serving.repository import spec_for
    from training import layout

    spec = spec_for(model)
    runner = OnnxRuntimeRunner(layout.onnx_path(model, repo))
    feeds = example_inputs(spec, n * batch)
    cases = []
    for i in range(n):
        f = {k: np.ascontiguousarray(v[i * batch:(i + 1) * batch]) for k, v in feeds.items()}
        cases.append(Case(f, runner.infer(f)))
    return cases


@dataclass
class LoadResult:
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    by_protocol: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": len(self.errors), "wrong": len(self.wrong), "by_protocol": self.by_protocol,
                "first_errors": self.errors[:3], "first_wrong": self.wrong[:3]}


class Load:
    """``workers`` threads per protocol, each with its own ``serving.client.Client`` (no client-side retries: what
    fails is what a client sees), sending ``cases`` round-robin until ``stop()``; every answer is checked.

    ``connect()`` (also done by ``start()``) starts the threads and waits until each has made its client (in its own
    thread: tritonclient's HTTP client belongs to the thread that made it). A client asks whether the model is
    ready, which the front door answers with a real probe inference, so a test that counts the replicas'
    inferences reads its baseline after ``connect()``; the requests begin with ``start()``."""

    def __init__(self, urls: dict[str, str], model: str, cases: list[Case], workers: int = 2,
                 retries: int = 0, timeout: float = 30.0) -> None:
        from export.compare import spec_tolerance
        from serving.repository import spec_for

        self.urls, self.model, self.cases, self.workers = urls, model, cases, workers
        self.retries, self.timeout = retries, timeout
        self.spec = spec_for(model)
        self.tol = spec_tolerance(self.spec)
        self.result = LoadResult(by_protocol=dict.fromkeys(urls, 0))
        self._lock = threading.Lock()
        self._stop, self._go = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []
        self._connected = threading.Semaphore(0)

    def connect(self, timeout: float = 60.0) -> Load:
        if self._threads:
            return self
        for proto in self.urls:
            for k in range(self.workers):
                t = threading.Thread(target=self._worker, args=(proto, k), daemon=True, name=f"load-{proto}-{k}")
                t.start()
                self._threads.append(t)
        for _ in self._threads:
            if not self._connected.acquire(timeout=timeout):
                raise TimeoutError(f"load: clients not connected after {timeout:g} s")
        return self

    def _check(self, i: int, got: dict[str, np.ndarray]) -> str | None:
        from export.compare import compare

        c = compare(self.cases[i].ref, got, self.spec.outputs, self.tol, where=f"case {i}")
        return None if c.ok else "; ".join(c.failures)[:300]

    def _worker(self, protocol: str, k: int) -> None:
        from serving.client import Client

        try:
            client = Client(self.model, protocol, self.urls[protocol], timeout=self.timeout, retries=self.retries)
        except Exception as e:
            with self._lock:
                self.result.errors.append(f"{protocol}: connect: {str(e)[:300]}")
            return
        finally:
            self._connected.release()
        self._go.wait()
        i = k
        try:
            while not self._stop.is_set():
                case = i % len(self.cases)
                i += self.workers
                try:
                    got = client.infer(self.cases[case].feeds)
                except Exception as e:
                    with self._lock:
                        self.result.errors.append(f"{protocol}: {str(e)[:300]}")
                    continue
                bad = self._check(case, got)
                with self._lock:
                    if bad:
                        self.result.wrong.append(f"{protocol}: {bad}")
                    else:
                        self.result.ok += 1
                        self.result.by_protocol[protocol] += 1
        finally:
            client.close()

    def start(self) -> Load:
        self.connect()
        self._go.set()
        return self

    def done(self) -> int:
        with self._lock:
            return self.result.ok + len(self.result.errors) + len(self.result.wrong)

    def wait_for(self, n: int, timeout: float = 60.0) -> None:
        """Until ``n`` more requests have been answered (or failed)."""
        target, deadline = self.done() + n, time.monotonic() + timeout
        while self.done() < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load: only {self.done()} of {target} requests done after {timeout:g} s")
            time.sleep(0.02)

    def stop(self) -> LoadResult:
        self._stop.set()
        self._go.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)
        return self.result

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ front door


def _front_door_main(triton_grpc: str, http_port: int, grpc_port: int, ready: Any, stop: Any) -> None:
    from serving.stack import front_door

    with front_door(triton_grpc, "127.0.0.1", http_port, grpc_port, explorer=False):
        ready.set()
        stop.wait()


@contextlib.contextmanager
def front_door_process(triton_grpc: str, timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """The front door (HTTP + gRPC, ``serving.stack.front_door``) in front of ``triton_grpc`` (Envoy's socket or a
    replica's), in a process of its own as `make serve` runs it, so that it does not share the load's interpreter
    lock; yields {"grpc": host:port, "http": host:port}."""
    from serving.server import free_ports

    ctx = multiprocessing.get_context("spawn")
    http, grpc = free_ports(2)
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_front_door_main, args=(triton_grpc, http, grpc, ready, stop), daemon=True,
                       name="frontdoor")
    proc.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the front door in front of {triton_grpc} did not start "
                                   f"(exit code {proc.exitcode})")
        yield {"grpc": f"127.0.0.1:{grpc}", "http": f"127.0.0.1:{http}"}
    finally:
        stop.set()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join()


# ------------------------------------------------------------------------------------------- benchmark


def _client(model: str, protocol: str, url: str) -> Any:
    from serving.client import Client

    return Client(model, protocol, url, retries=0)


def added_latency(model: str, envoy: dict[str, str], direct: dict[str, str], cases: list[Case], n: int
                  ) -> dict[str, Any]:
    """Concurrency 1, the two paths (``envoy``, ``direct``: {protocol: front door URL}) alternating request by
    request: {protocol: {path: percentiles}}."""
    out: dict[str, Any] = {}
    for proto in PROTOCOLS:
        clients = {"envoy": _client(model, proto, envoy[proto]), "direct": _client(model, proto, direct[proto])}
        lat: dict[str, list[float]] = {"envoy": [], "direct": []}
        for i in range(n + 10):
            order = ("envoy", "direct") if i % 2 == 0 else ("direct", "envoy")  # neither always goes first
            for path in order:
                t0 = time.perf_counter()
                clients[path].infer(cases[i % len(cases)].feeds, validate=False)
                if i >= 10:  # warm-up: connections, first batches
                    lat[path].append((time.perf_counter() - t0) * 1e3)
        for c in clients.values():
            c.close()
        out[proto] = {path: {**percentiles(v), "n": len(v)} for path, v in lat.items()}
        out[proto]["added_p50_ms"] = out[proto]["envoy"]["p50"] - out[proto]["direct"]["p50"]
    return out


def throughput(model: str, envoy_grpc: str, direct_grpc: str, cases: list[Case], duration: float, rounds: int,
               concurrency: int = 16) -> dict[str, Any]:
    """Concurrency ``concurrency`` over gRPC to the two front doors, alternating rounds: {path: {rps per round,
    mean, latency}}."""
    from bench.common import measure_callable

    out: dict[str, Any] = {"envoy": {"rounds": []}, "direct": {"rounds": []}}
    clients = {"envoy": _client(model, "grpc", envoy_grpc), "direct": _client(model, "grpc", direct_grpc)}
    counter = {"i": 0}

    def call(path: str) -> Callable[[], Any]:
        def one() -> Any:
            counter["i"] += 1
            return clients[path].infer(cases[counter["i"] % len(cases)].feeds, validate=False)
        return one

    for r in range(rounds):
        for path in (("envoy", "direct") if r % 2 == 0 else ("direct", "envoy")):
            p50, p95, p99, rps, n = measure_callable(call(path), concurrency, duration)
            out[path]["rounds"].append({"rps": rps, "p50": p50, "p95": p95, "p99": p99, "n": n})
    for path in ("envoy", "direct"):
        rs = out[path]["rounds"]
        out[path]["rps"] = float(np.mean([x["rps"] for x in rs]))
        out[path]["p50"] = float(np.median([x["p50"] for x in rs]))
    out["ratio_envoy_over_direct"] = out["envoy"]["rps"] / out["direct"]["rps"]
    for c in clients.values():
        c.close()
    return out


def _fault_stats(stats: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    keys = ("upstream_rq_retry", "upstream_rq_retry_success", "outlier_detection.ejections_enforced_total")
    return {k: sum(v - before.get(n, 0) for n, v in stats.items() if n.startswith("cluster.triton_")
                   and n.endswith("." + k)) for k in keys}


def fault_comparison(rs: Any, model: str, cases: list[Case], after: int = 300) -> dict[str, Any]:
    """A replica's tritonserver SIGKILLed, then one replica's python stub, under load through two Envoys in front
    of the same replicas at once, each behind its own front door: the set's own (retry policy on) and a second one
    without a retry policy. {fault: {envoy: load summary + Envoy's retry / ejection counters}}."""
    import os
    import signal

    from serving.envoy import Envoy, Policy, temp_workdir
    from serving.server import free_ports

    work = temp_workdir()
    plain = Envoy(work, free_ports(1)[0], policy=Policy(retries=0))
    plain.start([r.endpoint for r in rs.replicas])
    envoys = {"retries": rs.envoy, "no_retries": plain}
    out: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            doors = {k: stack.enter_context(front_door_process(e.grpc_url)) for k, e in envoys.items()}
            for fault in ("replica SIGKILL", "python stub SIGKILL"):
                loads = {k: Load(doors[k], model, cases).connect() for k in envoys}
                before = {k: e.stats() for k, e in envoys.items()}
                for load in loads.values():
                    load.start()
                for load in loads.values():
                    load.wait_for(60)
                if fault == "replica SIGKILL":
                    victim = rs.replicas[0]
                    n = len(victim.supervisor.restarts)
                    os.kill(victim.server.proc.pid, signal.SIGKILL)
                    deadline = time.monotonic() + 60
                    while len(victim.supervisor.restarts) == n or not victim.supervisor.restarts[-1]["ok"]:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{victim.name} was not restarted")
                        time.sleep(0.2)
                    for e in envoys.values():
                        e.wait_hosts({victim.socket}, timeout=30, names=[victim.name])
                else:
                    victim = rs.replicas[-1]
                    for pid in victim.server.stub_pids(model):
                        os.kill(pid, signal.SIGKILL)
                for load in loads.values():
                    load.wait_for(after)
                out[fault] = {k: {**load.stop().summary(), **_fault_stats(envoys[k].stats(), before[k])}
                              for k, load in loads.items()}
                if fault != "replica SIGKILL":
                    rs.heal(victim)
                    plain.wait_hosts(timeout=30)
    finally:
        plain.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def versions() -> dict[str, str]:
    import subprocess

    from serving.envoy import envoy_bin

    v = subprocess.run([str(envoy_bin()), "--version"], capture_output=True, text=True).stdout.strip()
    return {"envoy": v.rsplit("version: ", 1)[-1], "tritonserver": "2.51 (nvidia-pytriton 0.7.0)"}


DIRECT, THROUGH = "front door → one replica (its socket)", "front door → Envoy → 2 replicas"


def render(res: dict[str, Any]) -> str:
    lat, thr, faults = res["latency_c1"], res["throughput_c16"], res["faults"]
    frows = [[fault, "on (`previous_hosts`)" if k == "retries" else "off", f["ok"], f"**{f['errors']}**", f["wrong"],
              f["upstream_rq_retry"], f["upstream_rq_retry_success"], f["outlier_detection.ejections_enforced_total"]]
             for fault, by in faults.items() for k, f in by.items()]
    rows = []
    for proto in PROTOCOLS:
        for path in ("direct", "envoy"):
            p = lat[proto][path]
            rows.append([proto, DIRECT if path == "direct" else THROUGH,
                         f"{p['p50']:.2f}", f"{p['p95']:.2f}", f"{p['p99']:.2f}", p["n"]])
        rows.append([proto, "**Envoy's added p50**", f"**{lat[proto]['added_p50_ms']:+.2f}**", "", "", ""])
    trows = [[(THROUGH if path == "envoy" else DIRECT), f"{thr[path]['rps']:.0f}",
              " / ".join(f"{x['rps']:.0f}" for x in thr[path]["rounds"]), f"{thr[path]['p50']:.1f}"]
             for path in ("direct", "envoy")]
    return "\n".join([
        "# Scale-out: Envoy in front of private tritonserver replicas, behind the front door",
        "",
        f"Model `{res['model']}` (python backend + onnxruntime), batch 1, real test images; "
        f"{res['cpus']} CPU cores; Envoy {res['versions']['envoy']}, tritonserver {res['versions']['tritonserver']}. "
        f"Command: `{res['command']}` ({res['seconds']:.0f} s).",
        "",
        "Every request goes through a front door (HTTP + gRPC, the validating surface of `make serve`, each in a "
        "process of its own). The replicas are private (gRPC on a unix socket, no HTTP, no admin key); Envoy listens "
        "on a unix socket that only the front door reaches. The two paths differ only in what is behind two "
        "identical front doors: Envoy with 2 replicas, or one of those replicas' sockets directly.",
        "",
        "## Added latency at concurrency 1 (ms; the two paths alternate request by request)",
        "",
        md_table(["protocol (client → front door)", "path", "p50", "p95", "p99", "n"], rows),
        "",
        f"## Throughput at concurrency 16 (gRPC; {res['rounds']} alternating rounds of {res['duration']:g} s)",
        "",
        md_table(["path", "req/s (mean)", "per round", "p50 ms"], trows),
        "",
        f"Through Envoy with 2 replicas / one replica direct: **{thr['ratio_envoy_over_direct']:.2f}x**. The host was "
        f"shared with other work (1-minute load average {res['loadavg_1m']['start']:.1f} at the start, "
        f"{res['loadavg_1m']['end']:.1f} at the end, on {res['cpus']} cores): compare rounds, not single figures.",
        "",
        "## Faults under load: client-visible errors with and without Envoy's retry policy",
        "",
        "Two Envoys in front of the same 2 replicas at once, each behind its own front door with its own closed-loop "
        "load (2 gRPC + 2 HTTP clients that never retry, every answer checked against onnxruntime); the fault hits "
        "both. The stub's replica is healed (drained, model reloaded) after the count.",
        "",
        md_table(["fault", "Envoy retries", "ok", "errors", "wrong", "retries", "retry successes", "ejections"],
                 frows),
        "",
        "**What this host can and cannot show.** With 2 CPU cores, one replica already has both cores (its "
        "onnxruntime session, its python stub, the gRPC frontend), and the clients, the front door (Python), Envoy "
        "and the second replica compete for the same two cores. So 2 replicas cannot show throughput scaling here: "
        "the ratio above measures the cost of the extra hop and of splitting the cores, not what a second machine "
        "(or a second GPU) would add. Spreading the same 16 requests over two replicas also halves each one's "
        "dynamic batches, and Envoy's own worker threads take CPU from them. What replicas give on this host is "
        "availability (a replica or its python stub killed under load, 0 client-visible errors: "
        "`tests/test_scaleout.py`), not speed. Throughput scaling needs one replica per core set or per host.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    import os

    from export.cli_loop import parse
    from serving.replicas import ReplicaSet
    from training import paths

    p = bench_parser("python -m bench.scaleout", __doc__, "seconds per throughput round", 3,
                     "alternating throughput rounds per path")
    p.add_argument("--requests", type=int, default=300, help="requests per path and protocol at concurrency 1")
    a, models = parse(p, argv)
    if models is None:
        return 1
    try:
        model = "cnn" if a.models == ["all"] else models[0]  # one small model: the tier is measured, not it
        t0, load0 = time.monotonic(), os.getloadavg()[0]  # a shared host: say how busy it was
        cases = reference_cases(model, 16, repo=a.repo)
        with ReplicaSet(a.repo, [model], 2, watchdog_s=0) as rs, \
                front_door_process(rs.grpc_url) as envoy, \
                front_door_process(rs.replicas[0].server.grpc_url) as direct:
            # every answer through both paths checked once before timing
            checked = {}
            for path, door in (("envoy", envoy), ("direct", direct)):
                with Load(door, model, cases, workers=1) as load:
                    load.wait_for(32)
                checked[path] = load.result.summary()
                if load.result.errors or load.result.wrong:
                    raise RuntimeError(f"answers through the front door ({path}) failed: {checked[path]}")
            lat = added_latency(model, envoy, direct, cases, a.requests)
            thr = throughput(model, envoy["grpc"], direct["grpc"], cases, a.duration, a.rounds)
            faults = fault_comparison(rs, model, cases)
        res = {"model": model, "cpus": os.cpu_count(), "versions": versions(), "latency_c1": lat,
               "throughput_c16": thr, "faults": faults, "duration": a.duration, "rounds": a.rounds,
               "requests": a.requests,
               "checked": checked,
               "paths": {"direct": DIRECT, "envoy": THROUGH},
               "command": " ".join(["python -m bench.scaleout",
                                     *(argv if argv is not None else sys.argv[1:])]),
               "loadavg_1m": {"start": load0, "end": os.getloadavg()[0]}}
        res["seconds"] = time.monotonic() - t0
        out = paths.REPORTS_DIR
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaleout.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "scaleout.md").write_text(with_host_line(render(res)))
        print(f"wrote {out / 'scaleout.md'}")
        return 0
    except Exception as e:
        return cli_error(e, a.debug)


if __name__ == "__main__":
    sys.exit(main())
