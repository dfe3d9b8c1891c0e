"""Prometheus over the replica set: a scrape config for every replica's Triton metrics port and Envoy's
``/stats/prometheus``, and the Debian ``prometheus`` binary run on it (``make prometheus`` installs it).

Both are TCP on 127.0.0.1 and read-only: the replicas' metrics ports (their inference APIs are unix sockets), and
Envoy's stats listener, which forwards only ``GET /stats/prometheus`` to its admin socket (``serving.envoy``):
Prometheus cannot scrape a unix socket.

Jobs and labels (what rules and dashboards select on): job ``attnzoo-triton`` with one target per replica,
labelled ``replica="<name>"``; job ``attnzoo-envoy`` (path ``/stats/prometheus``). The recording and alert rules live in
``deploy/prometheus/rules.yml`` (tested with ``promtool test rules``) and are loaded when that file exists.

    python -m serving.prometheus --config-only --target replica0=127.0.0.1:8002 --envoy 127.0.0.1:9901
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from serving.cli import cli_error
from serving.process import terminate
from serving.server import free_ports

TRITON_JOB, ENVOY_JOB = "attnzoo-triton", "attnzoo-envoy"  # the names deploy/prometheus/rules.yml selects on
RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "rules.yml"


class PrometheusError(RuntimeError):
    """A one-line problem with the prometheus binary, its config or a query."""


def _hostport(url: str) -> str:
    """``http://127.0.0.1:8002/metrics`` or ``127.0.0.1:8002`` -> ``127.0.0.1:8002``."""
    return urllib.parse.urlsplit(url if "://" in url else f"http://{url}").netloc


def scrape_config(replicas: Mapping[str, str], envoy: str | None = None, *, interval_s: float = 5.0,
                  rules: Path | None = RULES) -> dict[str, Any]:
    """The config: ``replicas`` {name: metrics URL or host:port}, ``envoy`` Envoy's stats URL or host:port."""
    if not replicas:
        raise PrometheusError("no replica metrics targets to scrape")
    scrape = [{"job_name": TRITON_JOB, "metrics_path": "/metrics",
               "static_configs": [{"targets": [_hostport(u)], "labels": {"replica": name}}
                                  for name, u in sorted(replicas.items())]}]
    if envoy:
        scrape.append({"job_name": ENVOY_JOB, "metrics_path": "/stats/prometheus",
                       "static_configs": [{"targets": [_hostport(envoy)]}]})
    cfg: dict[str, Any] = {"global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
                           "scrape_configs": scrape}
    if rules is not None and Path(rules).exists():
        cfg["rule_files"] = [str(Path(rules).resolve())]
    return cfg


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    """JSON is YAML: written as JSON, read by prometheus as its YAML config."""
    path.write_text(json.dumps(cfg, indent=1))
    return path


def prometheus_bin() -> str:
    exe = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if exe is None:
        raise PrometheusError("prometheus is not installed: `make prometheus` (Debian package prometheus)")
    return exe


def check_config(path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    r = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise PrometheusError(f"promtool check config {path}: {(r.stdout + r.stderr).strip().splitlines()[-1]}")


class Prometheus:
    """A prometheus server on 127.0.0.1 with its own temp storage; ``query`` runs an instant PromQL query."""

    def __init__(self, cfg: dict[str, Any], port: int | None = None, workdir: Path | None = None) -> None:
        self.cfg, self.port = cfg, port or free_ports(1)[0]
        self._own = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="attnzoo-prometheus-"))
        self.config_path = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Prometheus:
        write_config(self.cfg, self.config_path)
        check_config(self.config_path)
        cmd = [prometheus_bin(), f"--config.file={self.config_path}",
               f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                    self.stop()
                    raise PrometheusError(f"prometheus did not start: {' | '.join(tail)}") from None
                time.sleep(0.2)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query: [{"metric": {labels}, "value": float}]."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise PrometheusError(f"query {promql!r}: {body.get('error', body)}")
        return [{"metric": s["metric"], "value": float(s["value"][1])} for s in body["data"]["result"]]

    def targets_up(self) -> dict[str, str]:
        """{scrape URL: health} of the active targets."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as r:
            body = json.loads(r.read())
        return {t["scrapeUrl"]: t["health"] for t in body["data"]["activeTargets"]}

    def rules(self) -> dict[str, str]:
        """{rule name: health} of every loaded recording and alerting rule ("ok" once it evaluated cleanly)."""
        with urllib.request.urlopen(f"{self.url}/api/v1/rules", timeout=10) as r:
            body = json.loads(r.read())
        return {rule["name"]: rule.get("health", "unknown") for g in body["data"]["groups"] for rule in g["rules"]}

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.prometheus", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="a replica's Triton metrics endpoint (repeat per replica)")
    p.add_argument("--envoy", default=None, help="Envoy's stats HOST:PORT (its GET /stats/prometheus listener)")
    p.add_argument("--interval", type=float, default=5.0, help="scrape interval in seconds")
    p.add_argument("--port", type=int, default=9090, help="prometheus' own port (127.0.0.1)")
    p.add_argument("--config-only", action="store_true", help="print the config and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        targets = {}
        for t in args.target:
            name, sep, hp = t.partition("=")
            if not sep or not name or not hp:
                raise PrometheusError(f"--target must be NAME=HOST:PORT, got {t!r}")
            targets[name] = hp
        cfg = scrape_config(targets, args.envoy, interval_s=args.interval)
        if args.config_only:
            print(json.dumps(cfg, indent=1))
            return 0
        with Prometheus(cfg, args.port) as prom:
            print(f"prometheus on {prom.url} (config {prom.config_path})", flush=True)
            prom.proc.wait()  # type: ignore[union-attr]
        return 0
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        return cli_error(e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
