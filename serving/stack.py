"""The served stack (`make serve`): a private tritonserver, its supervisor, and the front door as the only ports.

Exposure model: clients reach only the front door, which validates every request before Triton sees it, over
HTTP (KServe v2 REST, port 8000) and gRPC (KServe v2 ``GRPCInferenceService``, port 8001). Triton itself listens
on no port a client can reach: its gRPC API is a unix socket inside a 0700 folder (only this user, i.e. the
supervisor and the front door, can connect), its HTTP API is off, and so no admin key exists to leak (model control
is reachable only by the server's owner, who can already change its files). Its metrics stay on 127.0.0.1:8002
(read-only counters, for Prometheus). The python backend's shared memory is a private 0700 tmpfs and the server's
files are 0600 (``serving.server``).

The supervisor restarts a dead tritonserver forever (with a capped backoff) and reloads a model whose probe
inference fails; while it does, the front door answers 503 with Retry-After and ``/v2/health/ready`` is 503 with
the reason, and ``GET /status`` shows the supervisor's state.

    python -m serving.stack [--repo DIR] [--models ...] [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001]
                            [--metrics-port 8002] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path

from serving import frontdoor, frontdoor_grpc
from serving.cli import cli_error
from serving.server import Supervisor, TritonServer, port_free


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.stack", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=None, help="model repository (default: model_repository/)")
    p.add_argument("--models", nargs="*", default=None, help="models to load (default: every config.pbtxt)")
    p.add_argument("--host", default="127.0.0.1", help="address the front door binds (0.0.0.0 to expose it)")
    p.add_argument("--http-port", type=int, default=8000, help="the front door's HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="the front door's gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton's metrics (always on 127.0.0.1)")
    p.add_argument("--max-body-mib", type=float, default=frontdoor.DEFAULT_BODY_LIMIT / 2**20,
                   help="request size limit (HTTP body, gRPC message)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument("--allow-load-errors", action="store_true", help="serve the models that load, report the rest")
    p.add_argument("--check", action="store_true", help="start, probe every model through the front door, stop")
    p.add_argument("--watchdog", type=float, default=10.0,
                   help="seconds between probe inferences that reload a model whose stub died (0: off)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before restarting a dead server; doubles")
    p.add_argument("--max-backoff", type=float, default=60.0, help="cap of that backoff (it never gives up)")
    p.add_argument("--log", type=Path, default=None, help="server log file (default: a temp file)")
    p.add_argument("--no-explorer", action="store_true", help="do not serve the explorer page at /explorer/")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    server = None
    try:
        for what, port in (("http", args.http_port), ("grpc", args.grpc_port)):
            if not port_free(port, args.host):
                raise RuntimeError(f"front door {what} port {args.host}:{port} is already in use")
        server = TritonServer(args.repo, args.models, metrics_port=args.metrics_port, private=True,
                              startup_timeout=args.timeout, require_all=not args.allow_load_errors,
                              log_path=args.log)
        t0 = time.monotonic()
        server.start()
        supervisor = Supervisor(server, args.backoff, args.max_backoff)
        limit = int(args.max_body_mib * 2**20)
        app = frontdoor.create_app(server.grpc_url, limit, explorer=not args.no_explorer,
                                   model_repository=server.repository, status=supervisor.status)
        with contextlib.ExitStack() as stack:
            http = stack.enter_context(frontdoor.serve_in_thread(app, args.host, args.http_port))
            grpc_url = stack.enter_context(frontdoor_grpc.serve_in_thread(
                server.grpc_url, args.host, args.grpc_port, limit, repository=server.repository,
                status=supervisor.status))
            print(f"serving in {time.monotonic() - t0:.1f} s: front door http://{http} (KServe v2 REST"
                  f"{'' if args.no_explorer else f'; explorer http://{http}/explorer/'}), grpc {grpc_url}; "
                  f"triton private ({server.grpc_url}), metrics {server.metrics_url}; log {server.log_path}",
                  flush=True)
            health = server.health()
            for m, err in health.items():
                print(f"  {m}: {'ok' if err is None else 'ERROR ' + err}", flush=True)
            if args.check:
                return 0 if not any(health.values()) else 1
            supervisor.run(args.watchdog)
        return 0
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        return cli_error(e, args.debug)
    finally:
        if server is not None:
            code = server.stop()
            if code is not None:
                print(f"tritonserver stopped (exit code {code})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
