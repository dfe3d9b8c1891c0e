"""The served stack (`make serve`): private tritonserver replicas, their supervisors, and the front door as the only
ports.

Exposure model: clients reach only the front door, which validates every request before Triton sees it, over
HTTP (KServe v2 REST, port 8000) and gRPC (KServe v2 ``GRPCInferenceService``, port 8001). Triton itself listens
on no port a client can reach: its gRPC API is a unix socket inside a 0700 folder (only this user, i.e. the
supervisor and the front door, can connect), its HTTP API is off, and so no admin key exists to leak (model control
is reachable only by the server's owner, who can already change its files). Its metrics stay on 127.0.0.1:8002
(read-only counters, for Prometheus). The python backend's shared memory is a private 0700 tmpfs and the server's
files are 0600 (``serving.server``).

With ``--replicas N`` (N >= 2) there are N such private servers (``serving.replicas``), each supervised, behind
Envoy (``serving.envoy``): Envoy listens on a unix socket (0600, in a 0700 folder) that the front door connects to,
reaches the replicas on their sockets, and keeps its admin interface on a socket too; only its read-only
``/stats/prometheus`` is on 127.0.0.1 (``--envoy-stats-port``), beside each replica's metrics port. Prometheus
(Debian's, where installed) scrapes them all (``--prometheus-port``).

The supervisor restarts a dead tritonserver forever (with a capped backoff) and reloads a model whose probe
inference fails; while it does, the front door answers 503 with Retry-After and ``/v2/health/ready`` is 503 with
the reason, and ``GET /status`` shows the supervisor's state.

    python -m serving.stack [--replicas N] [--repo DIR | s3://host:port/bucket/prefix] [--models ...]
                            [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from serving import frontdoor, frontdoor_grpc
from serving.cli import cli_error
from serving.objectstore import is_s3, make_server
from serving.server import BACKOFF_MAX_S, Supervisor, port_free


@contextlib.contextmanager
def front_door(triton_grpc: str, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
               body_limit: int = frontdoor.DEFAULT_BODY_LIMIT, *, explorer: bool = True,
               repository: Path | None = None,
               status: Callable[[], dict[str, Any]] | None = None) -> Iterator[tuple[str, str]]:
    """The front door's HTTP and gRPC surfaces in front of ``triton_grpc`` (a private server's socket, or
    Envoy's), each on its own thread; yields their ``host:port``."""
    app = frontdoor.create_app(triton_grpc, body_limit, explorer=explorer, model_repository=repository,
                               status=status)
    with contextlib.ExitStack() as stack:
        http = stack.enter_context(frontdoor.serve_in_thread(app, host, http_port))
        grpc = stack.enter_context(frontdoor_grpc.serve_in_thread(
            triton_grpc, host, grpc_port, body_limit, repository=repository, status=status))
        yield http, grpc


def _print_health(health: dict[str, str | None], prefix: str = "") -> None:
    for m, err in health.items():
        print(f"  {prefix}{m}: {'ok' if err is None else 'ERROR ' + err}", flush=True)


def _serve_one(args: argparse.Namespace, repo: str | Path | None, limit: int) -> int:
    """Today's stack: one private, supervised tritonserver behind the front door."""
    server = None
    try:
        server = make_server(repo, args.models, metrics_port=args.metrics_port, private=True,
                             startup_timeout=args.timeout, require_all=not args.allow_load_errors, log_path=args.log)
        t0 = time.monotonic()
        server.start()
        supervisor = Supervisor(server, args.backoff, args.max_backoff)
        local = None if is_s3(repo) else server.repository
        with front_door(server.grpc_url, args.host, args.http_port, args.grpc_port, limit,
                        explorer=not args.no_explorer, repository=local, status=supervisor.status) as (http, grpc):
            print(f"serving in {time.monotonic() - t0:.1f} s: front door http://{http} (KServe v2 REST"
                  f"{'' if args.no_explorer else f'; explorer http://{http}/explorer/'}), grpc {grpc}; "
                  f"triton private ({server.grpc_url}), metrics {server.metrics_url}; log {server.log_path}",
                  flush=True)
            health = server.health()
            _print_health(health)
            if args.check:
                return 0 if not any(health.values()) else 1
            supervisor.run(args.watchdog)
        return 0
    finally:
        if server is not None:
            code = server.stop()
            if code is not None:
                print(f"tritonserver stopped (exit code {code})", file=sys.stderr)


def _prometheus(rs: Any, port: int) -> Any:
    """Debian's prometheus on 127.0.0.1:port scraping every replica and Envoy, or None (off, or not installed)."""
    from serving.prometheus import Prometheus, PrometheusError, scrape_config

    if not port:
        return None
    cfg = scrape_config({r.name: r.server.metrics_url for r in rs.replicas}, rs.envoy.metrics_url)
    try:
        prom = Prometheus(cfg, port).start()
    except PrometheusError as e:
        print(f"prometheus: not started ({e}); scrape {', '.join(rs.metrics_targets().values())}", flush=True)
        return None
    print(f"prometheus: {prom.url} (config {prom.config_path}; the replicas started here)", flush=True)
    return prom


def _serve_replicas(args: argparse.Namespace, repo: str | Path | None, limit: int) -> int:
    """N private, supervised replicas behind Envoy (its socket), behind the front door."""
    from serving.envoy import Policy
    from serving.replicas import ReplicaSet

    rs = ReplicaSet(repo, args.models, args.replicas, stats_port=args.envoy_stats_port,
                    policy=Policy(max_request_bytes=limit + 2**20), watchdog_s=args.watchdog,
                    startup_timeout=args.timeout, require_all=not args.allow_load_errors, backoff_s=args.backoff,
                    max_backoff_s=args.max_backoff)
    prom = None
    try:
        t0 = time.monotonic()
        rs.start()
        local = None if is_s3(repo) else rs.replicas[0].server.repository
        with front_door(rs.grpc_url, args.host, args.http_port, args.grpc_port, limit,
                        explorer=not args.no_explorer, repository=local, status=rs.status) as (http, grpc):
            print(f"serving in {time.monotonic() - t0:.1f} s: front door http://{http} (KServe v2 REST"
                  f"{'' if args.no_explorer else f'; explorer http://{http}/explorer/'}), grpc {grpc}; "
                  f"{len(rs.replicas)} private replicas behind Envoy\n{rs.describe()}", flush=True)
            bad = False
            for r in rs.replicas:
                health = r.server.health()
                bad = bad or any(health.values())
                _print_health(health, f"{r.name} ")
            if args.check:
                return 1 if bad else 0
            prom = _prometheus(rs, args.prometheus_port)
            threading.Event().wait()  # the replicas' supervisors and the set's watchdog run in their threads
        return 0
    finally:
        if prom is not None:
            prom.stop()
        rs.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.stack", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=1,
                   help="tritonserver replicas: 1 (default) serves one directly; N >= 2 serves N behind Envoy")
    p.add_argument("--repo", default=None,
                   help="model repository: a folder (default: model_repository/) or s3://[host:port/]bucket/prefix")
    p.add_argument("--models", nargs="*", default=None, help="models to load (default: every config.pbtxt)")
    p.add_argument("--host", default="127.0.0.1", help="address the front door binds (0.0.0.0 to expose it)")
    p.add_argument("--http-port", type=int, default=8000, help="the front door's HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="the front door's gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002,
                   help="Triton's metrics (always on 127.0.0.1; with --replicas N >= 2 each replica takes a free port)")
    p.add_argument("--envoy-stats-port", type=int, default=9901,
                   help="Envoy's read-only GET /stats/prometheus on 127.0.0.1 (--replicas N >= 2)")
    p.add_argument("--prometheus-port", type=int, default=9090,
                   help="Debian's prometheus on 127.0.0.1:PORT scraping replicas and Envoy if installed "
                        "(--replicas N >= 2; 0: off)")
    p.add_argument("--max-body-mib", type=float, default=frontdoor.DEFAULT_BODY_LIMIT / 2**20,
                   help="request size limit (HTTP body, gRPC message)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument("--allow-load-errors", action="store_true", help="serve the models that load, report the rest")
    p.add_argument("--check", action="store_true", help="start, probe every model through the front door, stop")
    p.add_argument("--watchdog", type=float, default=10.0,
                   help="seconds between probe inferences that reload a model whose stub died (0: off)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before restarting a dead server; doubles")
    p.add_argument("--max-backoff", type=float, default=BACKOFF_MAX_S, help="cap of that backoff (it never gives up)")
    p.add_argument("--log", type=Path, default=None, help="server log file (default: a temp file; one replica only)")
    p.add_argument("--no-explorer", action="store_true", help="do not serve the explorer page at /explorer/")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error(f"--replicas must be >= 1, got {args.replicas}")

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        ports = [("front door http", args.host, args.http_port), ("front door grpc", args.host, args.grpc_port)]
        if args.replicas > 1:
            ports += [("envoy stats", "127.0.0.1", args.envoy_stats_port)]
        for what, host, port in ports:
            if not port_free(port, host):
                raise RuntimeError(f"{what} port {host}:{port} is already in use")
        repo: str | Path | None = args.repo if args.repo is None or is_s3(args.repo) else Path(args.repo)
        limit = int(args.max_body_mib * 2**20)
        return (_serve_one if args.replicas == 1 else _serve_replicas)(args, repo, limit)
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        return cli_error(e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
