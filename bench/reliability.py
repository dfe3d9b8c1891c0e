"""python -m bench.reliability: the reliability report (``reports/reliability.{md,json}``), measured on a
real tritonserver with a real front door, on the exported ``cnn`` (or an untrained one with ``--untrained``).

1. Every bad input, sent straight to Triton over gRPC and HTTP (binary) and as raw JSON to the front
   door: the status and the one-line message it got, and whether the server stayed healthy.
2. A mixed load: good requests from 16 threads with NaN requests among them; counts of answers that
   were right, refused as expected, or wrong.
3. Recovery: a killed python stub (found by the probe, healed by a reload) and a killed server (the
   HTTP request that aborts tritonserver 2.51, restarted by the supervisor): seconds until it serves again.
4. Memory (RSS of the server and its stubs) after warm-up and after the long run.
5. The stack as `make serve` runs it (``bench.reliability_stack``): another local user (uid 65534) trying
   every way in, 100+ killer requests to every port it reaches, 10 SIGKILLs of tritonserver in 2 minutes, and
   small-image latency beside a stream of maximal images before and after the large-request lane.
Parts 1-4 talk to Triton's own loopback ports, which `make serve` no longer exposes: they show what the front
door and the private socket keep away.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.markdown import with_host_line
from serving import repository as rep
from serving.cli import cli_error

MODEL = "cnn"
KILLER = {"inputs": [{"name": "image", "shape": [64, 1, 100000, 100000], "datatype": "FP32", "data": []}]}


def _json_request(shape: list[int], data: Any, datatype: str = "FP32", name: str = "image") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}).encode()


def tensor_cases(image: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Bad tensors a client library can send (gRPC and HTTP binary alike)."""
    nan = image.copy()
    nan[0, 0, 5, 5] = np.nan
    return {
        "wrong channels [1,3,64,64]": {"image": np.zeros((1, 3, 64, 64), np.float32)},
        "wrong rank [1,64,64]": {"image": image[0]},
        "wrong dtype FP64": {"image": image.astype(np.float64)},
        "batch over max (65)": {"image": np.zeros((65, 1, 64, 64), np.float32)},
        "unknown input 'img'": {"img": image},
        "NaN in data": {"image": nan},
        "empty batch": {"image": np.zeros((0, 1, 64, 64), np.float32)},
        "1x1 image": {"image": np.zeros((1, 1, 1, 1), np.float32)},
        "4096x4096 image": {"image": np.zeros((1, 1, 4096, 4096), np.float32)},
    }


def body_cases() -> dict[str, tuple[bytes, dict[str, str]]]:
    """Raw HTTP bodies only an untrusted client sends: what the front door is for."""
    json_ct = {"Content-Type": "application/json"}
    return {
        "claims [64,1,100000,100000], no data": (json.dumps(KILLER).encode(), json_ct),
        "malformed JSON": (b'{"inputs": [', json_ct),
        "data shorter than the shape": (_json_request([1, 1, 64, 64], [0.0] * 10), json_ct),
        "negative dimension": (_json_request([1, 1, -64, 64], []), json_ct),
        '"NaN" in the data': (_json_request([1, 1, 48, 48], ["NaN"] + [0.0] * (48 * 48 - 1)), json_ct),
        "binary garbage": (os.urandom(256), {"Content-Type": "application/octet-stream"}),
        "1x1 image": (_json_request([1, 1, 1, 1], [0.5]), json_ct),
        "unknown model": (_json_request([1, 1, 64, 64], [0.0] * 4096), json_ct),
    }


def _post(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    import http.client

    host, _, port = url.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except OSError as e:
        return 0, f"connection failed: {type(e).__name__}: {e}"
    finally:
        conn.close()
    try:
        msg = json.loads(raw).get("error", "")
    except (ValueError, AttributeError):
        msg = raw.decode(errors="replace")
    return resp.status, " ".join(str(msg).split())[:200]


def is_client_error(status: str) -> bool:
    """A refusal that blames the request: HTTP 4xx, or gRPC INVALID_ARGUMENT / NOT_FOUND."""
    return status.startswith("4") or status.removeprefix("StatusCode.") in ("INVALID_ARGUMENT", "NOT_FOUND")


def bad_inputs(server, frontdoor_url: str, image: np.ndarray) -> list[dict[str, Any]]:
    from serving.client import Client, InferenceError

    rows = []
    for protocol in ("grpc", "http"):
        url = server.grpc_url if protocol == "grpc" else server.http_url
        with Client(MODEL, protocol, url) as client:
            for case, feeds in tensor_cases(image).items():
                try:
                    client.infer(feeds, validate=False)
                    status, msg = "200", "answered (WRONG: should have been refused)"
                except InferenceError as e:
                    status, msg = str(e.status), " ".join(str(e).split())[:200]
                rows.append({"path": f"Triton {protocol}", "case": case, "status": status, "message": msg,
                             "healthy_after": server.health([MODEL])[MODEL] is None})
    for case, (body, headers) in body_cases().items():
        model = "no_such_model" if case == "unknown model" else MODEL
        status, msg = _post(frontdoor_url, f"/v2/models/{model}/infer", body, headers)
        rows.append({"path": "front door (HTTP)", "case": case, "status": str(status), "message": msg,
                     "healthy_after": server.alive() and server.health([MODEL])[MODEL] is None})
    return rows


def mixed_load(server, image: np.ndarray, n: int, threads: int = 16) -> dict[str, Any]:
    """``n`` requests over gRPC from ``threads`` threads; every 10th carries a NaN and must be refused."""
    from serving.client import Client

    with Client(MODEL, "grpc", server.grpc_url) as client:
        ref = client.infer(image)["logits"]
        nan = image.copy()
        nan[0, 0, 0, 0] = np.nan
        items = [nan if i % 10 == 9 else image for i in range(n)]
        t0 = time.perf_counter()
        got = client.infer_many(items, concurrency=threads, validate=False, return_errors=True)
        elapsed = time.perf_counter() - t0
    counts = {"requests": n, "threads": threads, "right": 0, "refused_as_expected": 0, "wrong": 0}
    for i, g in enumerate(got):
        bad = i % 10 == 9
        if bad and isinstance(g, Exception) and "NaN" in str(g):
            counts["refused_as_expected"] += 1
        elif not bad and not isinstance(g, Exception) and np.array_equal(g["logits"], ref):
            counts["right"] += 1
        else:
            counts["wrong"] += 1
    counts["seconds"] = round(elapsed, 2)
    counts["requests_per_s"] = round(n / elapsed, 1)
    return counts


def stub_kill(server) -> dict[str, Any]:
    pids = server.stub_pids(MODEL)
    t0 = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    while server.health([MODEL])[MODEL] is None:  # the READY flag does not notice; a real inference does
        time.sleep(0.05)
    detected = time.monotonic() - t0
    healed = server.heal()
    while server.health([MODEL])[MODEL] is not None:
        time.sleep(0.05)
    return {"killed_pid": pids[0], "detected_s": round(detected, 2), "serving_again_s": round(time.monotonic() - t0, 2),
            "healed": sorted(healed)}


def server_kill(server) -> dict[str, Any]:
    from serving.server import Supervisor, http_json

    sup = Supervisor(server, backoff_base_s=0.5, log=lambda msg: None)
    t0 = time.monotonic()
    try:
        http_json("POST", f"http://{server.http_url}/v2/models/{MODEL}/infer", KILLER, timeout=60)
        died = False
    except OSError:
        died = True
    while server.alive() and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    record = sup.check()
    total = time.monotonic() - t0
    return {"killer_request_killed_it": died and record is not None, "why": record["why"] if record else None,
            "restart_s": record.get("restart_s") if record else None, "serving_again_s": round(total, 2),
            "healthy_after": server.health() == {m: None for m in server.models}}


def _repository(tmp: Path, untrained: bool) -> Path:
    from training import layout

    repo = tmp / "repo"
    dst = layout.onnx_path(MODEL, repo)
    dst.parent.mkdir(parents=True)
    if untrained or not layout.onnx_path(MODEL).exists():
        from export.onnx_export import export_onnx
        from training.registry import create_model, get_spec

        export_onnx(get_spec(MODEL), create_model(MODEL).eval(), dst)
    else:
        dst.symlink_to(layout.onnx_path(MODEL).resolve())
    rep.write_repository([MODEL], "cpu", repo)
    return repo


def run(n_load: int, long_requests: int, untrained: bool, log=print, stack: bool = True) -> dict[str, Any]:
    from serving.frontdoor import create_app, serve_in_thread
    from serving.server import TritonServer, free_ports
    from training.data import test_images

    image = np.ascontiguousarray(test_images(1)[0])
    report: dict[str, Any] = {"model": MODEL, "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        repo = _repository(Path(tmp), untrained)
        http, grpc, metrics, door = free_ports(4)
        with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, require_all=True) as server:
            app = create_app(f"127.0.0.1:{grpc}")
            with serve_in_thread(app, port=door) as door_url:
                log("bad inputs ...")
                report["bad_inputs"] = bad_inputs(server, door_url, image)
                log("mixed load ...")
                report["mixed_load"] = mixed_load(server, image, n_load)
                report["rss_after_warmup_mb"] = round(server.rss_bytes() / 2**20, 1)
                log(f"long run ({long_requests} requests) ...")
                report["long_run"] = mixed_load(server, image, long_requests)
                report["rss_after_long_run_mb"] = round(server.rss_bytes() / 2**20, 1)
                log("stub kill ...")
                report["stub_kill"] = stub_kill(server)
                log("server kill ...")
                report["server_kill"] = server_kill(server)
        if stack:
            report["stack"] = stack_run(repo, log)
    return report


def stack_run(repo: Path, log=print) -> dict[str, Any]:
    from bench import reliability_stack as rs
    from training import layout

    models = sorted(p.parent.name for p in repo.glob(f"*/{layout.CONFIG_FILE}"))
    out: dict[str, Any] = {}
    with rs.running_stack(repo, models) as stack:
        log("the stack, as uid 65534: every way in, the killer requests 8 times ...")
        out["local_user"] = rs.local_user_attack(stack, MODEL, repeat=8)
        log("the stack: 10 SIGKILLs of tritonserver in 2 minutes ...")
        out["sigkills"] = rs.sigkill_storm(stack, kills=10, within_s=120)
    log("large images beside small ones, before and after the lane ...")
    out["isolation"] = rs.isolation(repo, MODEL)
    return out


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reliability.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Reliability",
        "",
        f"Generated by `python -m bench.reliability` on {report['date']} ({report['cpus']} CPUs), model "
        f"`{report['model']}`, real tritonserver 2.51 + the front door; do not edit.",
        "",
        "## Bad inputs",
        "",
        "| path | case | status | message | server healthy after |",
        "|---|---|---|---|---|",
    ]
    for r in report["bad_inputs"]:
        msg = r["message"].replace("|", "/")
        lines.append(f"| {r['path']} | {r['case']} | {r['status']} | {msg} | {'yes' if r['healthy_after'] else 'NO'} |")
    for key, title in (("mixed_load", "Mixed load"), ("long_run", "Long run")):
        m = report[key]
        lines += ["", f"## {title}", "",
                  f"{m['requests']} gRPC requests from {m['threads']} threads, every 10th with a NaN: "
                  f"{m['right']} answered right, {m['refused_as_expected']} refused as expected, {m['wrong']} wrong; "
                  f"{m['seconds']} s ({m['requests_per_s']} req/s)."]
    s, k = report["stub_kill"], report["server_kill"]
    lines += ["", "## Recovery", "",
              f"- python stub killed (SIGKILL): the probe saw it in {s['detected_s']} s; serving again after "
              f"{s['serving_again_s']} s (healed: {', '.join(s['healed'])}).",
              f"- tritonserver killed by one HTTP request (shape [64,1,100000,100000], no data): "
              f"{'died' if k['killer_request_killed_it'] else 'did NOT die'} ({k['why']}); the supervisor restarted "
              f"it in {k['restart_s']} s; serving again {k['serving_again_s']} s after the request; every model "
              f"healthy: {k['healthy_after']}. Through the front door the same request is a 400 (table above).",
              "", "## Memory", "",
              f"RSS of the server and its stubs: {report['rss_after_warmup_mb']} MB after warm-up, "
              f"{report['rss_after_long_run_mb']} MB after the long run."]
    if "stack" in report:
        from bench.reliability_stack import report_lines

        lines += report_lines(report["stack"])
    path = out_dir / "reliability.md"
    path.write_text(with_host_line("\n".join(lines) + "\n"))
    return path


def main(argv: list[str] | None = None) -> int:
    from training import paths

    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", type=int, default=2400, help="requests in the mixed load")
    p.add_argument("--long", type=int, default=20000, help="requests in the long run (memory)")
    p.add_argument("--untrained", action="store_true", help="export an untrained cnn instead of using make export's")
    p.add_argument("--out", type=Path, default=None, help="report folder (default reports/)")
    p.add_argument("--no-stack", action="store_true", help="skip part 5 (the stack: local user, SIGKILLs, isolation)")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    try:
        report = run(a.load, a.long, a.untrained, stack=not a.no_stack)
        path = write_report(report, a.out or paths.REPORTS_DIR)
    except Exception as e:
        return cli_error(e, a.debug)
    bad = [r for r in report["bad_inputs"] if not is_client_error(r["status"])]
    print(f"wrote {path}; {len(report['bad_inputs'])} bad inputs tried, {len(bad)} not refused with a client error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
