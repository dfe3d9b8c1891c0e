"""N supervised, private tritonserver replicas behind Envoy, one repository (a folder or an ``s3://`` URL) for all.

Each replica is a private ``serving.server.TritonServer`` (its gRPC API on a unix socket in a 0700 folder, HTTP off,
no admin key; only its metrics port on 127.0.0.1), kept serving by its own ``Supervisor`` (restart on death with a
capped backoff, forever). Envoy (``serving.envoy``) balances over the replicas' sockets, health-checks, ejects and
retries, and listens itself on a unix socket that only the front door (``serving.stack --replicas N``) connects
to: the front door stays the only surface a client reaches. Replicas are added and removed at runtime without
losing a request:

- **add**: start the replica, wait until it serves (every model loaded and probed), then publish it to Envoy and
  wait until Envoy's health check passes;
- **remove**: mark it ``DRAINING`` in Envoy's endpoints (no new requests), wait until Envoy holds no request on it,
  stop its supervisor and then the server (SIGTERM: Triton finishes what it holds), and only then drop it from
  the endpoints.

A model whose python stub died stays READY (and the replica SERVING to health checks) while every inference fails:
the set's watchdog probes each replica with a real inference and reloads such a model, the replica drained first.

    python -m serving.replicas [--replicas 2] [...]   (an alias of ``python -m serving.stack --replicas N``)
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.envoy import Endpoint, Envoy, EnvoyError, Policy, temp_workdir
from serving.objectstore import make_server
from serving.server import BACKOFF_BASE_S, BACKOFF_MAX_S, Supervisor, TritonServer, free_ports


@dataclass
class Replica:
    name: str
    server: TritonServer
    supervisor: Supervisor
    thread: threading.Thread | None = None
    draining: bool = False
    removed: dict[str, Any] = field(default_factory=dict)

    @property
    def socket(self) -> str:
        """The replica's gRPC unix socket (Triton's path, ``:0`` suffix included): what Envoy connects to."""
        return self.server.grpc_url.removeprefix("unix://")

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.socket, self.draining)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.server.metrics_url, timeout=5) as r:
            return r.read().decode()


def metric_sum(text: str, name: str) -> float:
    """Sum of one metric's samples over all label sets in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class ReplicaSet:
    """``replicas`` private tritonserver replicas + Envoy; a context manager, or ``start()`` / ``stop()``.
    ``grpc_url`` is Envoy's unix socket, for the front door."""

    def __init__(self, repository: str | Path | None = None, models: Sequence[str] | None = None,
                 replicas: int = 2, *, stats_port: int | None = None, policy: Policy | None = None,
                 watchdog_s: float = 10.0, startup_timeout: float = 180.0, require_all: bool = True,
                 backoff_s: float = BACKOFF_BASE_S, max_backoff_s: float = BACKOFF_MAX_S,
                 workdir: Path | None = None,
                 log: Callable[[str], None] | None = None, envoy_concurrency: int = 2) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.repository, self.models, self.initial = repository, list(models) if models else None, replicas
        self.watchdog_s, self.startup_timeout, self.require_all = watchdog_s, startup_timeout, require_all
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else temp_workdir()
        self.envoy = Envoy(self.workdir, stats_port or free_ports(1)[0], policy or Policy(), envoy_concurrency)
        self.replicas: list[Replica] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._count = 0

    @property
    def grpc_url(self) -> str:
        return self.envoy.grpc_url

    def metrics_targets(self) -> dict[str, str]:
        """{name: metrics URL} of every replica and of Envoy (``envoy``)."""
        return {**{r.name: r.server.metrics_url for r in self.replicas}, "envoy": self.envoy.metrics_url}

    def status(self) -> dict[str, Any]:
        """The set's state for the front door (``GET /status``, readiness): serving while one replica serves."""
        reps = {r.name: {**r.supervisor.status(), "draining": r.draining} for r in list(self.replicas)}
        serving = [n for n, s in reps.items() if s["state"] == "serving" and not s["draining"]]
        down = [s for s in reps.values() if s["state"] != "serving"]
        return {"state": "serving" if serving else ("restarting" if reps else "stopped"),
                "replicas_serving": len(serving), "replicas": reps,
                "restarts": sum(s["restarts"] for s in reps.values()),
                "crashes_in_a_row": max((s["crashes_in_a_row"] for s in reps.values()), default=0),
                "last_reason": next((s["last_reason"] for s in down if s["last_reason"]), None),
                "backoff_s": max((s["backoff_s"] for s in down), default=0.0)}

    # lifecycle
    def _new_replica(self) -> Replica:
        with self._lock:
            name = f"replica{self._count}"
            self._count += 1
        server = make_server(self.repository, self.models, metrics_port=free_ports(1)[0], private=True,
                             startup_timeout=self.startup_timeout, require_all=self.require_all)
        sup = Supervisor(server, self.backoff_s, self.max_backoff_s, log=lambda msg, n=name: self.log(f"{n}: {msg}"))
        return Replica(name, server, sup)

    def _launch(self, r: Replica) -> Replica:
        r.server.start()
        # The supervisor restarts a dead server; broken models are healed by this set's watchdog (drained first).
        r.thread = threading.Thread(target=r.supervisor.run, args=(0,), daemon=True, name=f"supervisor-{r.name}")
        r.thread.start()
        return r

    def _publish(self) -> None:
        self.envoy.set_endpoints([r.endpoint for r in self.replicas])

    def start(self) -> ReplicaSet:
        new = [self._new_replica() for _ in range(self.initial)]
        try:
            # Replicas start in parallel: start-up is mostly waiting (model loads, python stubs importing).
            with ThreadPoolExecutor(len(new)) as pool:
                for f in [pool.submit(self._launch, r) for r in new]:
                    f.result()
            self.replicas = new
            self.envoy.start([r.endpoint for r in self.replicas], timeout=60)
            if self.watchdog_s:
                self._watchdog = threading.Thread(target=self._watch, daemon=True, name="replica-watchdog")
                self._watchdog.start()
        except BaseException:
            for r in new:
                self._halt(r)
            self.envoy.stop()
            raise
        return self

    def add(self) -> Replica:
        """Start one more replica; it gets requests once it serves and Envoy's health check passed."""
        r = self._new_replica()
        self._launch(r)
        with self._lock:
            self.replicas.append(r)
            self._publish()
        self.envoy.wait_hosts({r.socket}, timeout=30, names=[r.name])
        self.log(f"{r.name}: added ({r.socket})")
        return r

    def _drain(self, r: Replica, timeout: float) -> tuple[float, int]:
        """Mark ``r`` DRAINING in Envoy and wait until Envoy holds no request on it; returns (seconds, requests
        Envoy sent it in all)."""
        with self._lock:
            r.draining = True
            self._publish()
        t0 = time.monotonic()
        self.envoy.wait_hosts({r.socket}, timeout=10, predicate="draining", names=[r.name])
        while True:
            host = self.envoy.hosts().get(r.socket, {"rq_active": 0, "rq_total": 0})
            if host["rq_active"] == 0:
                return time.monotonic() - t0, host["rq_total"]
            if time.monotonic() > t0 + timeout:
                raise EnvoyError(f"{r.name}: still {host['rq_active']} requests in flight after {timeout:g} s "
                                 "of draining")
            time.sleep(0.05)

    def remove(self, replica: Replica | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """Drain and stop one replica (default: the newest); returns {"drain_s", "stop_s", "served"}."""
        with self._lock:
            if len(self.replicas) <= 1:
                raise ValueError("cannot remove the last replica")
            r = replica or self.replicas[-1]
        drain_s, served = self._drain(r, timeout)
        t0 = time.monotonic()
        self._halt(r)
        with self._lock:
            self.replicas.remove(r)
            self._publish()
        r.removed = {"drain_s": round(drain_s, 3), "stop_s": round(time.monotonic() - t0, 3), "served": served}
        self.log(f"{r.name}: drained in {drain_s:.2f} s and removed ({served} requests through Envoy)")
        return r.removed

    def heal(self, r: Replica, timeout: float = 60.0) -> dict[str, str]:
        """Reload the models of ``r`` whose probe inference fails (a dead python stub keeps its model READY),
        drained first: a reload unloads the model, and requests that reach it meanwhile fail ("no available
        versions"), which Envoy must not retry blindly. Returns {model: the probe's error} of what was broken."""
        broken = {m: e for m, e in r.server.health().items() if e}
        if not broken:
            return {}
        self._drain(r, timeout)
        try:
            r.server.heal()
        finally:
            with self._lock:
                r.draining = False
                self._publish()
        self.envoy.wait_hosts({r.socket}, timeout=30, names=[r.name])
        self.log(f"{r.name}: reloaded {sorted(broken)} after a failed probe ({next(iter(broken.values()))[:200]})")
        return broken

    def _watch(self) -> None:
        """Every ``watchdog_s``: heal each serving replica (the supervisors restart dead servers themselves)."""
        while not self._stop.wait(self.watchdog_s):
            for r in list(self.replicas):
                if r.draining or not r.server.alive():
                    continue
                try:
                    self.heal(r)
                except Exception as e:  # a replica dying meanwhile: its supervisor handles it
                    self.log(f"{r.name}: watchdog: {type(e).__name__}: {str(e)[:200]}")

    def _halt(self, r: Replica) -> None:
        r.supervisor.stop()
        if r.thread is not None:
            r.thread.join(timeout=30)
        r.server.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=60)
        self.envoy.stop()
        for r in self.replicas:
            self._halt(r)
        self.replicas = []
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ReplicaSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> str:
        lines = [f"envoy: grpc {self.grpc_url} (unix socket, 0600: the front door's upstream), admin "
                 f"unix://{self.envoy.admin_socket}, metrics {self.envoy.metrics_url}; config {self.envoy.config_path}"]
        for r in self.replicas:
            s = r.server
            lines.append(f"  {r.name}: triton private (grpc unix://{r.socket}), metrics {s.metrics_url}, "
                         f"log {s.log_path}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.stack --replicas 2`` (or the ``--replicas`` given), run in this process' place: replicas
    are served behind the front door only. (Exec, not import: the stack imports this module.)"""
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--replicas" or a.startswith("--replicas=") for a in args):
        args = ["--replicas", "2", *args]
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "serving.stack", *args])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
