"""deploy/prometheus/rules.yml under ``promtool`` (Debian's prometheus package; ``make prometheus`` installs it):
the rules load, their unit tests pass (rules_test.yml: the autoscaling signal reports what requests waited where
NVIDIA's k8s-onprem rule reports half, and each alert fires), and the tests fail when a rule is broken."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from training import paths

RULES_DIR = paths.REPO_ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed: `make prometheus` installs Debian's prometheus package "
                             "(needs root and apt-get)")


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_rules_load() -> None:
    r = promtool("check", "rules", "rules.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 9 rules found" in r.stdout


def test_rule_unit_tests_pass() -> None:
    r = promtool("test", "rules", "rules_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def _mutated(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the rules and their tests in which ``old`` is replaced by ``new`` in rules.yml."""
    shutil.copytree(RULES_DIR, tmp_path / "p")
    rules = tmp_path / "p" / "rules.yml"
    text = rules.read_text()
    assert old in text, f"{old!r} is not in rules.yml"
    rules.write_text(text.replace(old, new))
    return tmp_path / "p"


def test_naive_signal_fails_the_tests(tmp_path: Path) -> None:
    """The signal recorded as NVIDIA's rule computes it (unweighted mean over models, n+1) under-reports: the test
    that expects 8000 us on pod a gets less."""
    naive = ("avg by (namespace, pod, instance) (rate(nv_inference_queue_duration_us[1m])\n"
             "            / (1 + rate(nv_inference_request_success[1m])))")
    old = ("attnzoo:queue_us:rate1m / (attnzoo:request_success:rate1m > 0)\n"
           "            or attnzoo:request_success:rate1m * 0")
    r = promtool("test", "rules", "rules_test.yml", cwd=_mutated(tmp_path, old, naive))
    out = r.stdout + r.stderr
    assert r.returncode != 0
    # Expected 8000 us on pod a; the naive rule says (8000 * 4 / (1 + 4) + 0) / 2 = 3200.
    assert 'pod="a"} 8E+03' in out and 'pod="a"} 3.2E+03' in out, out


def test_alert_threshold_is_tested(tmp_path: Path) -> None:
    r = promtool("test", "rules", "rules_test.yml", cwd=_mutated(tmp_path, "> 0.05", "> 0.5"))
    assert r.returncode != 0 and "AttnzooErrorRatioHigh" in r.stdout + r.stderr


def test_idle_replica_is_tested(tmp_path: Path) -> None:
    """Without the ``or ... * 0`` an idle replica has no sample at all (0/0), and the test says so."""
    old = ("attnzoo:queue_us:rate1m / (attnzoo:request_success:rate1m > 0)\n"
           "            or attnzoo:request_success:rate1m * 0")
    r = promtool("test", "rules", "rules_test.yml", cwd=_mutated(tmp_path, old, "attnzoo:queue_us:rate1m / "
                                                                              "attnzoo:request_success:rate1m"))
    assert r.returncode != 0 and 'pod="a"} NaN' in r.stdout + r.stderr


def _query(url: str, expr: str) -> list[dict]:
    import json
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{url}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=5) as r:
        return json.load(r)["data"]["result"]


def _counter(text: str, name: str, model: str) -> float:
    import re

    return sum(float(v) for v in re.findall(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M))


@pytest.mark.server
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed (`make prometheus`)")
def test_rules_on_a_real_scrape(tmp_path: Path) -> None:
    """Debian's prometheus scrapes pip's tritonserver every second with rules.yml loaded: after a burst of real
    inferences, the recorded queue time per request is exactly Triton's own queue time over its own request count
    for that burst, and the replica is up."""
    import math
    import time
    import urllib.request

    import yaml

    from serving.repository import FLOOR_MODEL, config_text, parse_config
    from serving.server import TritonServer, free_ports
    from training import layout

    if not layout.config_path(FLOOR_MODEL).exists():
        pytest.skip("model_repository/ is not generated (make export)")
    # The pass-through model without its warm-up requests (Triton counts them) and no probe inference at start: the
    # counters' first sample is 0, where rate() extrapolates the queue time and the request count alike.
    repo = tmp_path / "repo"
    shutil.copytree(layout.model_dir(FLOOR_MODEL), repo / FLOOR_MODEL, ignore=shutil.ignore_patterns("__pycache__"))
    config = parse_config(layout.config_path(FLOOR_MODEL).read_text())
    del config.model_warmup[:]
    layout.config_path(FLOOR_MODEL, repo).write_text(config_text(config))
    http, grpc, metrics, web = free_ports(4)
    target = {"job_name": "attnzoo-triton", "static_configs": [{"targets": [f"127.0.0.1:{metrics}"]}]}
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
           "rule_files": [str(RULES_DIR / "rules.yml")], "scrape_configs": [target]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{web}"
    with TritonServer(repo, [FLOOR_MODEL], http_port=http, grpc_port=grpc, metrics_port=metrics,
                      probe=False) as server:
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def scraped(expr: str, value: float | None = None, timeout: float = 30) -> list[dict]:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    with __import__("contextlib").suppress(OSError):
                        res = _query(url, expr)
                        if res and (value is None or float(res[0]["value"][1]) == value):
                            return res
                    time.sleep(0.5)
                raise AssertionError(f"prometheus never gave {expr} = {value}")

            scraped('up{job="attnzoo-triton"}', 1)
            before = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
            for _ in range(40):
                assert server.probe(FLOOR_MODEL) is None
            deadline = time.monotonic() + 10  # Triton counts a request when it is released, just after its response
            while True:
                after = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
                if _counter(after, "nv_inference_request_success", FLOOR_MODEL) >= 40 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            queue = _counter(after, "nv_inference_queue_duration_us", FLOOR_MODEL) - \
                _counter(before, "nv_inference_queue_duration_us", FLOOR_MODEL)
            success = _counter(after, "nv_inference_request_success", FLOOR_MODEL) - \
                _counter(before, "nv_inference_request_success", FLOOR_MODEL)
            assert success == 40, f"Triton counted {success} of the 40 requests"
            assert queue > 0, "Triton counted no queue time for the burst"
            assert _counter(before, "nv_inference_request_success", FLOOR_MODEL) == 0
            total = _counter(after, "nv_inference_request_success", FLOOR_MODEL)
            scraped("sum(nv_inference_request_success)", total)  # the burst's last sample is in
            deadline = time.monotonic() + 20  # and, within a few evaluations, the rules have run on it
            while True:
                got = scraped("attnzoo:queue_us_per_request:rate1m")
                if math.isclose(float(got[0]["value"][1]), queue / success, rel_tol=1e-6):
                    break
                assert time.monotonic() < deadline, f"recorded {got}, Triton's own ratio {queue / success}"
                time.sleep(0.5)
            assert got[0]["metric"]["instance"] == f"127.0.0.1:{metrics}"
            assert float(scraped("attnzoo:pending_requests:sum")[0]["value"][1]) == 0
        finally:
            prom.terminate()
            prom.wait(20)
