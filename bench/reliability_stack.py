"""The stack as `make serve` runs it (``serving.stack``: private tritonserver, supervisor, front door), attacked
by another local user, killed repeatedly, and loaded with large images: the second half of `make reliability`.

- ``local_user_attack``: ``serving.local_user`` run as uid 65534 (``setpriv``; root only, else skipped with the
  reason): secrets, Triton's private socket, shared memory and logs, and every killer request to every port that
  user reaches; then whether tritonserver kept its pid and its stubs, and how its memory moved.
- ``sigkill_storm``: tritonserver SIGKILLed ``kills`` times within ``within_s`` seconds; readiness sampled all along
  (it must never say ready while no tritonserver runs), then the seconds until it serves again.
- ``isolation``: p50/p99 of small-image requests idle and beside a stream of maximal-image requests, before (one
  preprocessing instance, no large-request lane) and after (two instances, the lane), in one run.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.process import terminate

NOBODY = 65534


@dataclass
class RunningStack:
    proc: subprocess.Popen
    http: str
    grpc: str
    metrics: str
    log: Path


def _get(hostport: str, path: str, timeout: float = 5.0) -> int:
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    except OSError:
        return 0
    finally:
        conn.close()


def post(hostport: str, path: str, body: bytes, headers: dict[str, str], timeout: float = 120.0) -> tuple[int, bytes]:
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body, headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@contextlib.contextmanager
def running_stack(repo: Path, models: list[str], *extra: str, timeout: float = 180.0) -> Iterator[RunningStack]:
    """``python -m serving.stack`` on free ports, as a subprocess (what `make serve` runs); yields once the front
    door says ready."""
    from serving.server import free_ports

    http, grpc, metrics = free_ports(3)
    fd, log = tempfile.mkstemp(prefix="stack-", suffix=".log")
    cmd = [sys.executable, "-m", "serving.stack", "--repo", str(repo), "--models", *models, "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--no-explorer", *extra]
    proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    os.close(fd)
    stack = RunningStack(proc, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}", Path(log))
    try:
        deadline = time.monotonic() + timeout
        while _get(stack.http, "/v2/health/ready") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serving.stack did not become ready: {stack.log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield stack
    finally:
        terminate(proc, 30)
        stack.log.unlink(missing_ok=True)


def _proc_children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def stack_pids(stack: RunningStack) -> set[int]:
    """The stack's process and all its descendants (tritonserver, its stubs, Envoy, ...)."""
    found, todo = set(), [stack.proc.pid]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += [c for c in _proc_children(pid) if c not in found]
    return found


def triton_pid(stack: RunningStack) -> int | None:
    for pid in _proc_children(stack.proc.pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
                return pid
    return None


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return round(total / 1024, 1)


def local_user_command(args: list[str]) -> list[str] | str:
    """The command that runs ``python -m serving.local_user ARGS`` as uid 65534, or why it cannot run here."""
    if os.geteuid() != 0:
        return "not root: cannot switch to another user (setpriv needs CAP_SETUID)"
    setpriv = shutil.which("setpriv")
    python = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
    if setpriv is None or python is None:
        return "setpriv or a system python of this version is missing"
    site = sysconfig.get_paths()["purelib"]
    root = str(Path(__file__).resolve().parents[1])
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all", "env", "-i",
            f"PYTHONPATH={site}{os.pathsep}{root}", "PYTHONDONTWRITEBYTECODE=1", python, "-m", "serving.local_user",
            *args]


def local_user_attack(stack: RunningStack, model: str, repeat: int = 1) -> dict[str, Any]:
    cmd = local_user_command(["--http", stack.http, "--grpc", stack.grpc, "--metrics", stack.metrics,
                              "--model", model, "--repeat", str(repeat)])
    if isinstance(cmd, str):
        return {"skipped": cmd}
    pid = triton_pid(stack)
    stubs = sorted(_proc_children(pid)) if pid else []
    rss_before = _rss_mb([pid, *stubs]) if pid else 0.0
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd="/")
    if r.returncode != 0:
        raise RuntimeError(f"serving.local_user failed: {r.stderr.strip()[-1000:]}")
    report = json.loads(r.stdout)
    after = triton_pid(stack)
    report.update(triton_pid_before=pid, triton_pid_after=after,
                  stubs_same=sorted(_proc_children(after)) == stubs if after else False,
                  rss_before_mb=rss_before, rss_after_mb=_rss_mb([after, *_proc_children(after)]) if after else 0.0,
                  ready_after=_get(stack.http, "/v2/health/ready") == 200)
    return report


def sigkill_storm(stack: RunningStack, kills: int = 10, within_s: float = 120.0,
                  recover_s: float = 180.0) -> dict[str, Any]:
    """SIGKILL tritonserver ``kills`` times, at even intervals over ``within_s`` or, when it is backing off at that
    moment, as soon as the supervisor has started it again; the front door's readiness is sampled every 0.1 s
    throughout: a sample that says ready while no tritonserver runs is a lie."""
    done, lies, samples, t0 = [], 0, 0, time.monotonic()
    give_up = t0 + within_s + recover_s
    for k in range(kills):
        slot = t0 + k * within_s / kills
        while (pid := triton_pid(stack)) is None or time.monotonic() < slot:
            if time.monotonic() > give_up:
                break
            ready = _get(stack.http, "/v2/health/ready", timeout=2) == 200
            lies += ready and triton_pid(stack) is None
            samples += 1
            time.sleep(0.1)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            done.append(round(time.monotonic() - t0, 1))
    t_last = time.monotonic()
    while _get(stack.http, "/v2/health/ready") != 200 and time.monotonic() - t_last < recover_s:
        time.sleep(0.2)
    serving = _get(stack.http, "/v2/health/ready") == 200
    return {"kills": len(done), "at_s": done, "readiness_samples": samples, "ready_while_down": lies,
            "serving_again_s": round(time.monotonic() - t_last, 1) if serving else None,
            "stack_running": stack.proc.poll() is None}


# --------------------------------------------------------------------------------------------- isolation


def image_request(data: bytes) -> tuple[bytes, dict[str, str]]:
    """One encoded file as a v2 binary-tensor request for a ``<name>_image`` model."""
    head = json.dumps({"inputs": [{"name": "image_file", "shape": [1, 1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(data) + 4}}]}).encode()
    return head + len(data).to_bytes(4, "little") + data, {"Content-Type": "application/octet-stream",
                                                           "Inference-Header-Content-Length": str(len(head))}


def small_and_large_images() -> tuple[bytes, bytes]:
    """A 64x64 PNG and a maximal one: a 6000x4000 RGBA PNG (24 MP, the per-request budget; smooth, so small on
    the wire), which costs about a second of decoding."""
    import io

    import numpy as np
    from PIL import Image

    from training.images import DEFAULT_MAX_REQUEST_PIXELS

    def png(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    rng = np.random.default_rng(0)
    small = png(Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)))
    w = 6000
    h = DEFAULT_MAX_REQUEST_PIXELS // w
    yy, xx = np.mgrid[0:h, 0:w]
    big = np.stack([(xx // 23) % 255, (yy // 17) % 255, ((xx + yy) // 31) % 255, xx * 0 + 200], -1).astype(np.uint8)
    return small, png(Image.fromarray(big, "RGBA"))


def _latencies(door: str, path: str, body: bytes, headers: dict[str, str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        status, _ = post(door, path, body, headers)
        if status != 200:
            raise RuntimeError(f"small-image request answered {status}")
        out.append((time.perf_counter() - t) * 1e3)
    return out


def isolation_phase(door: str, model: str, small: bytes, large: bytes, n: int = 200, loaded_s: float = 20.0,
                    streams: int = 2) -> dict[str, Any]:
    """Small-image latency idle (``n`` requests) and for ``loaded_s`` seconds beside ``streams`` clients sending the
    large image back to back."""
    from export.timing import percentiles

    path = f"/v2/models/{model}/infer"
    sb, sh = image_request(small)
    lb, lh = image_request(large)
    _latencies(door, path, sb, sh, 10)
    idle = percentiles(_latencies(door, path, sb, sh, n))
    stop, large_ms = threading.Event(), []

    def stream() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            status, _ = post(door, path, lb, lh)
            if status == 200:
                large_ms.append((time.perf_counter() - t) * 1e3)

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # the stream is decoding before the small requests start
    loaded, t_end = [], time.monotonic() + loaded_s
    while time.monotonic() < t_end:
        loaded += _latencies(door, path, sb, sh, 1)
    stop.set()
    for t in threads:
        t.join(120)
    stats = percentiles(loaded)
    return {"idle": idle, "loaded": stats, "loaded_n": len(loaded), "p99_ratio": round(stats["p99"] / idle["p99"], 2),
            "large_done": len(large_ms), "large_mean_ms": round(sum(large_ms) / max(len(large_ms), 1), 1)}


def isolation(repo: Path, name: str, n: int = 200, loaded_s: float = 20.0) -> dict[str, Any]:
    """Before and after, in one run on one private tritonserver: before = one preprocessing instance and no lane,
    after = the repository's config (two instances) and the front door's lane."""
    from serving import frontdoor
    from serving.server import TritonServer, free_ports
    from training import layout

    image_model = f"{name}{layout.IMAGE_SUFFIX}"
    pre_model = f"{name}_preprocess"
    small, large = small_and_large_images()
    out: dict[str, Any] = {"model": image_model, "large_bytes": len(large), "small_bytes": len(small),
                           "loadavg": round(os.getloadavg()[0], 2)}
    with TritonServer(repo, [name, pre_model, image_model], private=True, metrics_port=free_ports(1)[0]) as server:
        # After first: the repository's config as it loaded; then before, as a config override.
        for phase, lane in (("after", frontdoor.LARGE_REQUEST_PIXELS), ("before", None)):
            if lane is None:
                server.load(pre_model, config=with_instances(server.model_config(pre_model), 1))
            app = frontdoor.create_app(server.grpc_url, explorer=False, large_request_pixels=lane)
            with frontdoor.serve_in_thread(app, port=free_ports(1)[0]) as door:
                out[phase] = isolation_phase(door, image_model, small, large, n, loaded_s)
                out[phase]["instances"] = len_instances(server.model_config(pre_model))
                out[phase]["lane"] = lane is not None
    return out


def with_instances(cfg: dict, count: int) -> str:
    """A model's config (as Triton's JSON) with ``count`` instances, as a load override."""
    cfg = json.loads(json.dumps(cfg))
    for group in cfg.get("instance_group", []):
        group["count"] = count
    return json.dumps(cfg)


def len_instances(cfg: dict) -> int:
    return sum(int(g.get("count", 1)) for g in cfg.get("instance_group", []))


# ------------------------------------------------------------------------------------------------ report


def _local_user_lines(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [f"Not run: {r['skipped']}."]
    files = r["files"]
    readable = [f["file"] for f in files if f["result"] == "READ"]
    lines = [f"Run as uid {r['uid']} (`setpriv`), `python -m serving.local_user`:", "",
             f"- admin keys found in any process's command line or environment: {len(r['secrets'])}"
             + (f" ({', '.join(r['secrets'])})" if r["secrets"] else ""),
             "- Triton's private socket: " + ("; ".join(f"`{s['socket']}` {s['result']}" for s in r["sockets"])
                                              or "none listed"),
             f"- shared-memory regions and server logs tried: {len(files)}, readable: {len(readable)}"
             + (f" ({', '.join(readable)})" if readable else ""),
             f"- tritonserver pid {r['triton_pid_before']} before, {r['triton_pid_after']} after; its stubs the same: "
             f"{r['stubs_same']}; RSS {r['rss_before_mb']} MB before, {r['rss_after_mb']} MB after; front door ready "
             f"after: {r['ready_after']}", "",
             "| port | request | times sent | answers |", "|---|---|---|---|"]
    grouped: dict[tuple[str, str], list[str]] = {}
    for q in r["requests"]:
        grouped.setdefault((q["port"], q["request"]), []).append(q["answer"])
    for (port, request), answers in grouped.items():
        distinct = sorted(set(answers))
        shown = "; ".join(a.replace("|", "/") for a in distinct)
        lines.append(f"| {port} | {request} | {len(answers)} | {shown} |")
    lines += ["", f"{len(r['requests'])} requests in all."]
    return lines


def report_lines(stack: dict[str, Any]) -> list[str]:
    """The stack's part of reports/reliability.md."""
    k, iso = stack["sigkills"], stack["isolation"]
    lines = ["", "## The stack as `make serve` runs it", "",
             "Clients reach only the front door (HTTP and gRPC); tritonserver listens on a unix socket in a 0700 "
             "folder, with its HTTP API off and no admin key; its metrics port stays on 127.0.0.1.", "",
             "### Another local user", "", *_local_user_lines(stack["local_user"]), "",
             "### SIGKILLs", "",
             f"tritonserver SIGKILLed {k['kills']} times (at {', '.join(map(str, k['at_s']))} s: every 12 s, or as "
             "soon as the supervisor had started it again); the front door's "
             f"readiness sampled {k['readiness_samples']} times meanwhile, ready while no tritonserver ran: "
             f"{k['ready_while_down']}; serving again {k['serving_again_s']} s after the last kill; `serving.stack` "
             f"still running: {k['stack_running']}.", "",
             "### Large images beside small ones", "",
             f"`{iso['model']}`: small requests are a {iso['small_bytes']}-byte 64x64 PNG, one at a time (200 idle, "
             f"then for 20 s beside the stream); the stream is two clients sending a {iso['large_bytes']}-byte RGBA "
             "PNG of the per-request budget (24 MP decoded) back to back. Latencies in ms through the front door; "
             f"load average {iso.get('loadavg', '?')} when it started (other processes on the host share the cores).",
             "",
             "| | preprocessing instances | large-request lane | small idle p50 / p99 | small beside the stream "
             "p50 / p99 | p99 ratio | large answered, mean ms |", "|---|---|---|---|---|---|---|"]
    for phase in ("before", "after"):
        p = iso[phase]
        lines.append(f"| {phase} | {p['instances']} | {'on' if p['lane'] else 'off'} | {p['idle']['p50']:.1f} / "
                     f"{p['idle']['p99']:.1f} | {p['loaded']['p50']:.1f} / {p['loaded']['p99']:.1f} "
                     f"(n={p['loaded_n']}) | "
                     f"{p['p99_ratio']} | {p['large_done']}, {p['large_mean_ms']} |")
    lines += ["", "The lane lets one large request per model decode at a time (the rest wait in the front door, "
              "503 + Retry-After after 30 s), so a stream of them holds one of the two preprocessing instances and "
              "small requests keep the other; a large request still costs its decode time (about a second here)."]
    return lines
