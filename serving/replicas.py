"""N supervised tritonserver replicas behind Envoy, one repository (a folder or an ``s3://`` URL) for all.

Each replica is a ``serving.server.TritonServer`` on its own free loopback ports, kept serving by its own
``Supervisor`` (restart on death with backoff; a watchdog that reloads a model whose python stub died). Envoy
(``serving.envoy``) balances HTTP and gRPC over them, health-checks, ejects and retries. Replicas are added and
removed at runtime without losing a request:

- **add**: start the replica, wait until it serves (every model loaded and probed), then publish it to Envoy and
  wait until Envoy's health check passes;
- **remove**: mark it ``DRAINING`` in Envoy's endpoints (no new requests), wait until Envoy holds no request on it
  in either cluster, stop its supervisor and then the server (SIGTERM: Triton finishes what it holds), and only
  then drop it from the endpoints.

    python -m serving.replicas --replicas 2 [--repo DIR | --repo s3://host:port/bucket/prefix] [--models cnn ...]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving import admin
from serving.cli import cli_error
from serving.envoy import PROTOCOLS, Endpoint, Envoy, EnvoyError, Policy, temp_workdir
from serving.objectstore import make_server
from serving.server import Supervisor, TritonServer, free_ports


@dataclass
class Replica:
    name: str
    server: TritonServer
    supervisor: Supervisor
    thread: threading.Thread | None = None
    draining: bool = False
    removed: dict[str, Any] = field(default_factory=dict)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.server.http_port, self.server.grpc_port, self.server.host, self.draining)

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
    """``replicas`` tritonserver replicas + Envoy; a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, repository: str | Path | None = None, models: Sequence[str] | None = None,
                 replicas: int = 2, *, http_port: int | None = None, grpc_port: int | None = None,
                 admin_port: int | None = None, policy: Policy | None = None, watchdog_s: float = 10.0,
                 startup_timeout: float = 180.0, workdir: Path | None = None, key_file: Path | None = None,
                 log: Any = None, envoy_concurrency: int = 2) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.repository, self.models, self.initial = repository, list(models) if models else None, replicas
        self.watchdog_s, self.startup_timeout = watchdog_s, startup_timeout
        self.admin_key, self.key_file = admin.new_key(), key_file  # one key locks every replica's admin APIs
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else temp_workdir()
        ports = free_ports(3)
        self.envoy = Envoy(self.workdir, http_port or ports[0], grpc_port or ports[1], admin_port or ports[2],
                           policy or Policy(), envoy_concurrency)
        self.replicas: list[Replica] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._count = 0

    # urls
    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.envoy.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.envoy.grpc_port}"

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url

    def metrics_targets(self) -> dict[str, str]:
        """{name: metrics URL} of every replica and of Envoy (``envoy``)."""
        return {**{r.name: r.server.metrics_url for r in self.replicas}, "envoy": self.envoy.metrics_url}

    # lifecycle
    def _new_replica(self) -> Replica:
        with self._lock:
            name = f"replica{self._count}"
            self._count += 1
        http, grpc, metrics = free_ports(3)
        server = make_server(self.repository, self.models, http_port=http, grpc_port=grpc, metrics_port=metrics,
                             startup_timeout=self.startup_timeout, require_all=True, admin_key=self.admin_key,
                             key_file=self.key_file)
        sup = Supervisor(server, log=lambda msg, n=name: self.log(f"{n}: {msg}"))
        return Replica(name, server, sup)

    def _launch(self, r: Replica) -> Replica:
        r.server.start()
        # The supervisor restarts a dead server; broken models are healed by this set's watchdog (drained first).
        r.thread = threading.Thread(target=r.supervisor.run, args=(0,), daemon=True,
                                    name=f"supervisor-{r.name}")
        r.thread.start()
        return r

    def _publish(self) -> None:
        self.envoy.set_endpoints([r.endpoint for r in self.replicas])

    def _ports(self, rs: Sequence[Replica]) -> dict[str, set[int]]:
        return {p: {r.endpoint.port(p) for r in rs} for p in PROTOCOLS}

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
        self.envoy.wait_hosts({r.name}, timeout=30, ports=self._ports([r]))
        self.log(f"{r.name}: added (http {r.server.http_url}, grpc {r.server.grpc_url})")
        return r

    def _drain(self, r: Replica, timeout: float) -> tuple[float, int]:
        """Mark ``r`` DRAINING in Envoy and wait until Envoy holds no request on it in either cluster; returns
        (seconds, requests Envoy sent it in all)."""
        with self._lock:
            r.draining = True
            self._publish()
        t0 = time.monotonic()
        ports = self._ports([r])
        self.envoy.wait_hosts({r.name}, timeout=10, ports=ports, predicate="draining")
        while True:
            hosts = self.envoy.hosts()
            mine = [h for p in PROTOCOLS for a, h in hosts[p].items() if int(a.rsplit(":", 1)[1]) in ports[p]]
            active = sum(h["rq_active"] for h in mine)
            if active == 0:
                return time.monotonic() - t0, sum(h["rq_total"] for h in mine)
            if time.monotonic() > t0 + timeout:
                raise EnvoyError(f"{r.name}: still {active} requests in flight after {timeout:g} s of draining")
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
        self.envoy.wait_hosts({r.name}, timeout=30, ports=self._ports([r]))
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
        lines = [f"envoy: http {self.http_url}, grpc {self.grpc_url}, admin {self.envoy.admin_url} "
                 f"(metrics {self.envoy.metrics_url}); config {self.envoy.config_path}"]
        for r in self.replicas:
            s = r.server
            lines.append(f"  {r.name}: http {s.http_url}, grpc {s.grpc_url}, metrics {s.metrics_url}, log {s.log_path}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2, help="tritonserver replicas (default 2)")
    p.add_argument("--repo", default=None, help="model repository: a folder (default: model_repository/) or an "
                                                "s3://[host:port/]bucket/prefix URL")
    p.add_argument("--models", nargs="*", default=None, help="models to load (default: every model)")
    p.add_argument("--http-port", type=int, default=8000, help="Envoy's HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="Envoy's gRPC port")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin port (stats, /stats/prometheus)")
    p.add_argument("--prometheus-port", type=int, default=9090,
                   help="run Debian's prometheus on 127.0.0.1:PORT scraping every replica and Envoy (0: off)")
    p.add_argument("--no-retries", action="store_true", help="Envoy without a retry policy (for comparison)")
    p.add_argument("--watchdog", type=float, default=10.0, help="seconds between each replica's probe inferences")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds for a replica to become ready")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error(f"--replicas must be >= 1, got {args.replicas}")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rs = prom = None
    try:
        repo: str | Path | None = args.repo if args.repo is None or args.repo.startswith("s3://") else Path(args.repo)
        rs = ReplicaSet(repo, args.models, args.replicas, http_port=args.http_port, grpc_port=args.grpc_port,
                        admin_port=args.admin_port, policy=Policy(retries=0 if args.no_retries else Policy.retries),
                        watchdog_s=args.watchdog, startup_timeout=args.timeout, key_file=admin.default_key_file())
        t0 = time.monotonic()
        rs.start()
        print(f"{len(rs.replicas)} replicas ready behind Envoy in {time.monotonic() - t0:.1f} s; admin APIs locked "
              f"(key in {rs.key_file})\n{rs.describe()}\n"
              f"front door: python -m serving.frontdoor --triton-grpc {rs.grpc_url}", flush=True)
        if args.prometheus_port:
            from serving.prometheus import Prometheus, scrape_config

            # A static list of the replicas started here (one added later needs a restart of prometheus).
            cfg = scrape_config({r.name: r.server.metrics_url for r in rs.replicas}, rs.envoy.admin_url)
            prom = Prometheus(cfg, args.prometheus_port).start()
            print(f"prometheus: {prom.url} (config {prom.config_path})", flush=True)
        threading.Event().wait()
        return 0
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        return cli_error(e, args.debug)
    finally:
        if prom is not None:
            prom.stop()
        if rs is not None:
            rs.stop()


if __name__ == "__main__":
    sys.exit(main())
