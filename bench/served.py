"""Latency and throughput of every served model: in-process torch and onnxruntime vs Triton over gRPC and
HTTP, dynamic batching on and off, at concurrency 1 and 16, all in one run on one host.

Triton is measured with ``perf_analyzer`` (shipped by ``tritonclient[all]``) where it runs, else with a
Python client loop. The pass-through model (``passthrough``: Identity through the same python backend)
measures the fixed per-request cost of the serving path, the *floor*; each model's served overhead is
reported against it. Targets checked in the same run:
- served p50 at batch 1 (gRPC, concurrency 1) <= in-process onnxruntime p50 + 1.2 x floor;
- at concurrency 16, dynamic batching gives >= 2x the throughput of batching off.

Writes ``reports/bench.md`` (tables), ``reports/bench.json`` (every row) and ``reports/bench.png``.

    python -m bench.served [--models cnn racnn] [--quick] [--untrained]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import example_inputs, measure_callable
from export.markdown import with_host_line
from export.timing import percentiles
from serving import repository as rep
from serving.cli import cli_error

FLOOR_FACTOR = 1.2  # served p50 <= onnxruntime p50 + FLOOR_FACTOR x floor
MIN_BATCHING_GAIN = 2.0  # throughput at concurrency 16, dynamic batching on / off


@dataclass
class Row:
    model: str
    runtime: str  # torch | onnxruntime | triton
    protocol: str  # in-process | grpc | http
    batching: str  # on | off | - (in-process)
    concurrency: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float  # requests (= images, batch 1) per second
    requests: int
    tool: str  # perf_analyzer | python
    avg_server_batch: float | None = None  # images per execution on the server (shows the batcher at work)


@dataclass
class Settings:
    concurrency: tuple[int, ...] = (1, 16)
    protocols: tuple[str, ...] = ("grpc", "http")
    window_ms: int = 3000  # perf_analyzer -p (measurement window)
    stability: int = 50  # % (2 noisy cores: the default 10 never stabilises)
    max_trials: int = 5
    inprocess_s: float = 3.0
    tool: str = "auto"  # auto | perf_analyzer | python
    intra_op_threads: int | None = None  # override the spec's serving threads (served and in-process alike)
    pin: bool = True  # server + in-process references on the last cores, load generator on the first
    max_queue_delay_us: int | None = None  # override the spec's dynamic-batching queue delay
    frontdoor_requests: int = 300  # per path, for the front door's added latency
    large_response_requests: int = 10  # per wire format, for models with MB-sized responses


# --------------------------------------------------------------------------------------- in-process


def torch_model(name: str):
    """The trained model where a checkpoint exists, else fresh weights (same latency): (model, note)."""
    from training import MissingCheckpointError, create_model, load_trained

    if name == rep.FLOOR_MODEL:
        from torch import nn

        return nn.Identity(), ""
    try:
        return load_trained(name), ""
    except MissingCheckpointError:
        return create_model(name).eval(), "untrained weights"


# ------------------------------------------------------------------------------------------ triton


def perf_analyzer_bin() -> Path | None:
    path = Path(sys.executable).parent / "perf_analyzer"
    found = path if path.exists() else shutil.which("perf_analyzer")
    return Path(found) if found else None


def perf_analyzer_works() -> bool:
    from serving.server import prepare_runtime, server_env

    exe = perf_analyzer_bin()
    if exe is None:
        return False
    # Exit 127 "error while loading shared libraries" until libb64.so.0d / libcudart.so.12 are found.
    r = subprocess.run([str(exe), "--version"], env=server_env(prepare_runtime()), capture_output=True, text=True)
    return r.returncode == 0


def run_perf_analyzer(model: str, url: str, protocol: str, concurrency: int, data_json: Path, s: Settings,
                      cpus: list[int] | None = None) -> tuple[float, float, float, float, int]:
    from serving.server import prepare_runtime, server_env

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        cmd = [str(perf_analyzer_bin()), "-m", model, "-u", url, "-i", protocol, "-b", "1",
               "--concurrency-range", str(concurrency), "--input-data", str(data_json),
               "-p", str(s.window_ms), "--stability-percentage", str(s.stability),
               "--max-trials", str(s.max_trials), "-f", str(out)]
        r = subprocess.run(cmd, env=server_env(prepare_runtime()), capture_output=True, text=True, timeout=600,
                           preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        if r.returncode != 0 or not out.exists():
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"perf_analyzer failed for {model} ({protocol}, c={concurrency}): {' | '.join(tail)}")
        row = next(csv.DictReader(out.open()))
    us = 1e-3
    p50, p95, p99 = (float(row[f"p{q} latency"]) * us for q in (50, 95, 99))
    thr = float(row["Inferences/Second"])
    return p50, p95, p99, thr, int(thr * s.window_ms / 1e3)


def run_python_client(model: str, url: str, protocol: str, concurrency: int, inputs: dict[str, np.ndarray],
                      s: Settings) -> tuple[float, float, float, float, int]:
    """Fallback: sync requests from ``concurrency`` threads, one client each (tritonclient.http clients
    are not thread-safe; gRPC ones are, but one each keeps the two protocols comparable)."""
    from serving.client import Client

    local = threading.local()

    def call() -> None:
        if not hasattr(local, "c"):
            local.c = Client(model, protocol, url)
        local.c.infer(inputs, validate=False)

    return measure_callable(call, concurrency, s.inprocess_s, warmup=0)


def server_counts(server, model: str) -> tuple[int, int]:
    from serving.server import http_json

    code, body = http_json("GET", f"http://{server.http_url}/v2/models/{model}/stats")
    st = body["model_stats"][0] if code == 200 else {}
    return int(st.get("inference_count", 0)), int(st.get("execution_count", 0))


# ------------------------------------------------------------------------------------------- run


def split_cores() -> tuple[list[int], list[int]] | None:
    """(server cores, load-generator cores): the first core drives the load, the rest serve. None on 1 core.

    On a small host perf_analyzer would otherwise take CPU from the very server it measures (a real client
    runs on another machine); the in-process references run on the server's cores, so both sides of each
    comparison get the same CPUs.
    """
    cores = sorted(os.sched_getaffinity(0))
    return (cores[1:], cores[:1]) if len(cores) > 1 else None


def pin_this_process(cpus: list[int]) -> None:
    """Move every thread of this process (torch/onnxruntime pools included) onto ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cpus)


def bench_model(name: str, server, onnx_file: Path, s: Settings, use_pa: bool, log: Callable[[str], None],
                client_cpus: list[int] | None = None) -> tuple[list[Row], str]:
    import torch

    spec = rep.spec_for(name)
    inputs = example_inputs(spec)
    rows: list[Row] = []

    def add(runtime, protocol, batching, c, res, tool, avg_batch=None):
        rows.append(Row(name, runtime, protocol, batching, c, *(round(v, 4) for v in res[:4]), res[4], tool,
                        avg_batch))
        r = rows[-1]
        avg = f"  avg batch {avg_batch:.1f}" if avg_batch else ""
        log(f"  {name:18s} {runtime:11s} {protocol:10s} batching {batching:3s} c={c:<3d} p50 {r.p50_ms:8.3f} ms  "
            f"p99 {r.p99_ms:8.3f} ms  {r.throughput:8.1f} req/s{avg}")

    def config(batching: str):
        """The served config, with this run's overrides (the in-process onnxruntime reads its threads too)."""
        cfg = rep.model_config(spec, "cpu", dynamic_batching=batching == "on")
        if s.intra_op_threads:
            cfg.parameters["intra_op_threads"].string_value = str(s.intra_op_threads)
        if s.max_queue_delay_us is not None and batching == "on":
            cfg.dynamic_batching.max_queue_delay_microseconds = s.max_queue_delay_us
        return cfg

    # In-process references, on the same cores the server uses.
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # new threads inherit run()'s pinning
    model, note = torch_model(name)
    tx = [torch.from_numpy(v) for v in inputs.values()]

    def torch_call() -> None:
        with torch.inference_mode():  # thread-local: entered in each worker thread
            model(*tx)

    for c in s.concurrency:
        add("torch", "in-process", "-", c, measure_callable(torch_call, c, s.inprocess_s), "python")
    from export.runtime import ort_session

    sess = ort_session(onnx_file, threads=rep.intra_op_threads(config("on")))  # the served backend's options
    for c in s.concurrency:
        add("onnxruntime", "in-process", "-", c, measure_callable(lambda: sess.run(None, inputs), c, s.inprocess_s),
            "python")

    data_json = None
    if use_pa:
        data_json = Path(tempfile.mkstemp(suffix=".json")[1])
        data_json.write_text(json.dumps({"data": [{k: {"content": v[0].ravel().tolist(), "shape": list(v.shape[1:])}
                                                   for k, v in inputs.items()}]}))
    try:
        for batching in ("on", "off"):
            server.load(name, config=rep.config_json(config(batching)))  # same files, batcher on/off
            for protocol in s.protocols:
                url = server.grpc_url if protocol == "grpc" else server.http_url
                for c in s.concurrency:
                    inf0, exe0 = server_counts(server, name)
                    tool = "perf_analyzer" if use_pa else "python"
                    if use_pa:
                        try:
                            res = run_perf_analyzer(name, url, protocol, c, data_json, s, client_cpus)
                        except RuntimeError:
                            # Noisy host: no stable window. One retry with a window twice as long, then the
                            # Python client (marked as such in the table).
                            try:
                                res = run_perf_analyzer(name, url, protocol, c, data_json,
                                                        replace(s, window_ms=2 * s.window_ms), client_cpus)
                            except RuntimeError as e:
                                log(f"  {e}; measuring with the Python client instead")
                                res, tool = run_python_client(name, url, protocol, c, inputs, s), "python"
                    else:
                        res = run_python_client(name, url, protocol, c, inputs, s)
                    inf1, exe1 = server_counts(server, name)
                    avg = round((inf1 - inf0) / max(exe1 - exe0, 1), 2)
                    add("triton", protocol, batching, c, res, tool, avg)
    finally:
        server.load(name, config=rep.config_json(rep.model_config(spec, "cpu")))
        if data_json:
            data_json.unlink(missing_ok=True)
    return rows, note


def frontdoor_latency(server, model: str, n: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The front door's added latency: the same request direct over gRPC, direct over HTTP and through the
    front door, interleaved in one run, JSON and binary bodies."""
    from bench.frontdoor_overhead import format_overhead, measure_overhead
    from serving.frontdoor import create_app, serve_in_thread
    from serving.server import free_ports

    out = []
    with serve_in_thread(create_app(server.grpc_url), port=free_ports(1)[0]) as door:
        for binary in (False, True):
            r = measure_overhead(server.http_url, door, model, n, binary=binary, direct_grpc=server.grpc_url)
            log(format_overhead(r))
            out.append(r)
    return out


def frontdoor_markdown(results: list[dict[str, Any]]) -> str:
    lines = ["", "## Front door", "",
             "The same request (batch 1, the model's warm-up shape) sent straight to Triton over gRPC and HTTP and "
             "through the front door (`serving/frontdoor.py`: validates, then forwards over gRPC), interleaved "
             "one by one on kept-alive connections. ms.", "",
             "| model | body | direct gRPC p50 / p95 / p99 | direct HTTP p50 / p95 / p99 | front door p50 / p95 / p99 "
             "| added p50 vs HTTP | vs gRPC |", "|---|---|---|---|---|---|---|"]
    for r in results:
        cell = {k: " / ".join(f"{r[k][q]:.2f}" for q in ("p50", "p95", "p99")) for k in ("grpc", "direct", "frontdoor")}
        added_http = r["frontdoor"]["p50"] - r["direct"]["p50"]
        added_grpc = r["frontdoor"]["p50"] - r["grpc"]["p50"]
        body = f"{'binary' if r['binary'] else 'JSON'} ({r['request_bytes']} B)"
        lines.append(f"| {r['model']} | {body} | {cell['grpc']} | {cell['direct']} | {cell['frontdoor']} | "
                     f"{added_http:+.2f} | {added_grpc:+.2f} |")
    return "\n".join(lines) + "\n"


LARGE_RESPONSE_BYTES = 1 << 20  # batch-64 responses above this get the wire-format comparison


def response_bytes(spec, batch: int) -> int:
    """Bytes of a response's tensors at ``batch`` and the spec's opt sizes."""
    return sum(batch * int(np.prod(o.concrete())) * np.dtype(o.dtype).itemsize for o in spec.outputs)


def large_response_latency(server, model: str, n: int, log: Callable[[str], None], batch: int = 64
                           ) -> dict[str, Any]:
    """One batch-``batch`` request of real images, over gRPC, HTTP with binary tensors and HTTP with JSON
    tensors, interleaved ``n`` times: what a model with several MB per response costs on each wire format."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    from training.registry import get_spec

    spec = get_spec(model)
    feeds = example_inputs(spec, batch)
    clients = {"grpc": grpcclient.InferenceServerClient(server.grpc_url),
               "http binary": httpclient.InferenceServerClient(server.http_url, network_timeout=120),
               "http JSON": httpclient.InferenceServerClient(server.http_url, network_timeout=120)}

    def call(kind: str) -> float:
        tc = grpcclient if kind == "grpc" else httpclient
        kw = {} if kind == "grpc" else {"binary_data": kind == "http binary"}
        reqs = []
        for name, a in feeds.items():
            r = tc.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
            r.set_data_from_numpy(a, **kw)
            reqs.append(r)
        outs = [tc.InferRequestedOutput(o.name, **kw) for o in spec.outputs]
        t = time.perf_counter()
        res = clients[kind].infer(model, reqs, outputs=outs)
        got = [res.as_numpy(o.name) for o in spec.outputs]
        dt = time.perf_counter() - t
        if any(g is None or g.shape[0] != batch for g in got):
            raise RuntimeError(f"model {model!r}: {kind} response is missing outputs or samples")
        return dt

    lat: dict[str, list[float]] = {k: [] for k in clients}
    try:
        for i in range(n + 1):  # the first round warms up
            for kind in clients:
                dt = call(kind)
                if i:
                    lat[kind].append(dt * 1e3)
    finally:
        for c in clients.values():
            c.close()
    out = {"model": model, "batch": batch, "response_bytes": response_bytes(spec, batch), "requests": n,
           **{k: percentiles(v) for k, v in lat.items()}}
    log(f"{model} batch {batch} ({out['response_bytes'] / 1e6:.1f} MB): " +
        ", ".join(f"{k} p50 {out[k]['p50']:.1f} ms" for k in clients))
    return out


def large_response_markdown(results: list[dict[str, Any]]) -> str:
    if not results:
        return ""
    lines = ["", "## Large responses", "",
             f"Models whose response to a batch of 64 exceeds {LARGE_RESPONSE_BYTES >> 20} MiB (per-pixel outputs): "
             "one batch-64 request of real images, interleaved over gRPC, HTTP with binary tensors (what "
             "`serving.client` sends) and HTTP with JSON tensors. ms, client-measured round trip including "
             "decoding the response.", "",
             "| model | response | gRPC p50 / p95 / p99 | HTTP binary p50 / p95 / p99 | HTTP JSON p50 / p95 / p99 | "
             "JSON / binary (p50) |", "|---|---|---|---|---|---|"]
    for r in results:
        cell = {k: " / ".join(f"{r[k][q]:.1f}" for q in ("p50", "p95", "p99")) for k in
                ("grpc", "http binary", "http JSON")}
        lines.append(f"| {r['model']} | {r['response_bytes'] / 1e6:.1f} MB | {cell['grpc']} | {cell['http binary']} | "
                     f"{cell['http JSON']} | {r['http JSON']['p50'] / r['http binary']['p50']:.1f}x |")
    return "\n".join(lines) + "\n"


def _find(rows: list[Row], **kw) -> Row | None:
    return next((r for r in rows if all(getattr(r, k) == v for k, v in kw.items())), None)


def summarize(rows: list[Row]) -> dict[str, Any]:
    """Floor, per-model overhead against it, and the two targets."""
    c_lo, c_hi = min(r.concurrency for r in rows), max(r.concurrency for r in rows)
    floors = {(p, b): _find(rows, model=rep.FLOOR_MODEL, runtime="triton", protocol=p, batching=b, concurrency=c_lo)
              for p in ("grpc", "http") for b in ("on", "off")}
    out: dict[str, Any] = {"floor_ms": {f"{p}/{b}": r.p50_ms for (p, b), r in floors.items() if r}, "models": {}}
    for m in dict.fromkeys(r.model for r in rows):
        ort = _find(rows, model=m, runtime="onnxruntime", concurrency=c_lo)
        d: dict[str, Any] = {"onnxruntime_p50_ms": ort.p50_ms if ort else None}
        judged = m != rep.FLOOR_MODEL  # the floor is the yardstick, not a candidate
        for p in ("grpc", "http"):
            x: dict[str, Any] = {}
            served = _find(rows, model=m, runtime="triton", protocol=p, batching="on", concurrency=c_lo)
            floor = floors.get((p, "on"))
            if served and ort and floor:
                over = served.p50_ms - ort.p50_ms
                target = ort.p50_ms + FLOOR_FACTOR * floor.p50_ms
                x.update({"served_p50_ms": served.p50_ms, "overhead_ms": round(over, 4),
                          "overhead_in_floors": round(over / floor.p50_ms, 3), "latency_target_ms": round(target, 4)})
                if judged:
                    x["latency_ok"] = served.p50_ms <= target
            on = _find(rows, model=m, runtime="triton", protocol=p, batching="on", concurrency=c_hi)
            off = _find(rows, model=m, runtime="triton", protocol=p, batching="off", concurrency=c_hi)
            if on and off and c_hi > 1:
                gain = on.throughput / max(off.throughput, 1e-9)
                x.update({f"throughput_c{c_hi}_on": on.throughput, f"throughput_c{c_hi}_off": off.throughput,
                          "batching_gain": round(gain, 2)})
                if judged:
                    x["batching_ok"] = gain >= MIN_BATCHING_GAIN
            if x:
                d[p] = x
        out["models"][m] = d
    return out


def write_markdown(path: Path, rows: list[Row], summary: dict[str, Any], meta: dict[str, Any]) -> None:
    c_hi = max(r.concurrency for r in rows)
    lines = ["# Serving benchmark", "",
             f"Generated by `python -m bench.served` on {meta['host']} ({meta['cpus']} CPUs, load average "
             f"{meta['loadavg']} at start, {meta['loadavg_end']} at the end), {meta['date']}. "
             f"Triton {meta['triton']} (pip nvidia-pytriton, python backend + onnxruntime {meta['onnxruntime']}); "
             f"Triton measured with {meta['tool']} "
             f"({meta['tool_args']}). Batch 1 per request; latency in ms. "
             f"CPU pinning: {meta.get('pinning') or 'none (every process on every core)'}.", ""]
    floor = summary["floor_ms"]
    lines += ["**Floor** (pass-through model through the same python backend, p50 at concurrency 1): "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in floor.items()), ""]
    lines += ["## Targets", "",
              f"Served p50 (batching on, concurrency 1) <= onnxruntime p50 + {FLOOR_FACTOR} x floor; "
              f"dynamic batching at concurrency {c_hi} >= {MIN_BATCHING_GAIN:g}x the throughput of batching off.", "",
              "| model | protocol | onnxruntime p50 | served p50 | overhead | overhead / floor | target p50 | "
              f"latency | req/s c{c_hi} on | req/s c{c_hi} off | gain | batching |",
              "|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|:---:|"]
    for m, d in summary["models"].items():
        for p in ("grpc", "http"):
            x = d.get(p)
            if not x:
                continue
            ok = {True: "PASS", False: "FAIL", None: "-"}
            lines.append(
                f"| {m}{' (floor)' if m == rep.FLOOR_MODEL else ''} | {p} | {d['onnxruntime_p50_ms']:.3f} | "
                f"{x.get('served_p50_ms', float('nan')):.3f} | {x.get('overhead_ms', float('nan')):.3f} | "
                f"{x.get('overhead_in_floors', float('nan')):.2f} | {x.get('latency_target_ms', float('nan')):.3f} | "
                f"{ok[x.get('latency_ok')]} | {x.get(f'throughput_c{c_hi}_on', float('nan')):.0f} | "
                f"{x.get(f'throughput_c{c_hi}_off', float('nan')):.0f} | {x.get('batching_gain', float('nan')):.2f}x | "
                f"{ok[x.get('batching_ok')]} |")
    lines += ["", "## All measurements", "",
              "| model | runtime | protocol | batching | concurrency | p50 | p95 | p99 | req/s | server avg batch |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.runtime} | {r.protocol} | {r.batching} | {r.concurrency} | {r.p50_ms:.3f} | "
                     f"{r.p95_ms:.3f} | {r.p99_ms:.3f} | {r.throughput:.1f} | "
                     f"{'' if r.avg_server_batch is None else f'{r.avg_server_batch:.1f}'} |")
    if meta.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in meta["notes"]]]
    path.write_text(with_host_line("\n".join(lines) + "\n"))


def plot(path: Path, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    c_lo, c_hi = min(r.concurrency for r in rows), max(r.concurrency for r in rows)
    series = [("torch", "in-process", "-"), ("onnxruntime", "in-process", "-"), ("triton", "grpc", "on"),
              ("triton", "grpc", "off"), ("triton", "http", "on"), ("triton", "http", "off")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(series)
    for ax, c, metric, title in ((axes[0], c_lo, "p50_ms", f"p50 latency, concurrency {c_lo} (ms)"),
                                 (axes[1], c_hi, "throughput", f"throughput, concurrency {c_hi} (req/s)")):
        for j, (rt, proto, b) in enumerate(series):
            vals = [getattr(_find(rows, model=m, runtime=rt, protocol=proto, batching=b, concurrency=c) or
                            Row(m, rt, proto, b, c, 0, 0, 0, 0, 0, ""), metric) for m in models]
            label = rt if proto == "in-process" else f"triton {proto} batching {b}"
            ax.bar(np.arange(len(models)) + (j - len(series) / 2 + 0.5) * width, vals, width, label=label)
        ax.set_xticks(np.arange(len(models)), models, rotation=30, ha="right")
        ax.set_yscale("log")  # in-process and served numbers differ by orders of magnitude
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    floor = _find(rows, model=rep.FLOOR_MODEL, runtime="triton", protocol="grpc", batching="on", concurrency=c_lo)
    if floor:
        axes[0].axhline(floor.p50_ms, color="k", ls="--", lw=0.8,
                        label=f"floor (gRPC, batching on) {floor.p50_ms:.2f} ms")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(models: list[str] | None, s: Settings, out_dir: Path, repo_dir: Path | None = None, untrained: bool = False,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    import onnxruntime
    import torch

    from serving.server import TritonServer, free_ports
    from training import layout
    from training.registry import get_spec, list_models

    src = layout.repository_root(repo_dir)
    notes: list[str] = []
    names = [m for m in (list_models() if models is None else models) if m != rep.FLOOR_MODEL]
    composed = [m for m in names if get_spec(m).composition is not None]
    for m in composed:  # the batcher on/off comparison reconfigures one graph's model
        notes.append(f"{m}: a composed pipeline, timed served as an ensemble and as BLS with per-step statistics "
                     f"in reports/pipeline_{m}.md (`make pipeline-bench`)")
    names = [m for m in names if m not in composed]
    with tempfile.TemporaryDirectory(prefix="bench-repo-") as tmp:
        repo = Path(tmp)
        served = []
        for m in names:  # a temp repository on the exported graphs: the benchmark never edits model_repository/
            dst = layout.onnx_path(m, repo)
            dst.parent.mkdir(parents=True)
            if untrained:
                from export.onnx_export import export_onnx
                from training.registry import create_model

                export_onnx(get_spec(m), create_model(m), dst)
            elif layout.onnx_path(m, src).exists():
                dst.symlink_to(layout.onnx_path(m, src).resolve())
            else:
                notes.append(f"{m}: not exported ({layout.onnx_path(m, src)}); run `make export`")
                log(f"skip {m}: not exported")
                continue
            served.append(m)
        if untrained:
            notes.append("graphs exported from untrained weights (--untrained): latency only")
        rep.write_repository(served, "cpu", repo)
        use_pa = s.tool == "perf_analyzer" or (s.tool == "auto" and perf_analyzer_works())
        tool_args = (f"-b 1 -p {s.window_ms} --stability-percentage {s.stability} --max-trials {s.max_trials}, "
                     "real test image as --input-data") if use_pa else f"Python client threads, {s.inprocess_s} s"
        meta = {"host": platform.node(), "cpus": len(os.sched_getaffinity(0)),
                "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M"),
                "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                "tool": "perf_analyzer" if use_pa else "a Python client", "tool_args": tool_args, "notes": notes}
        split = split_cores() if s.pin and use_pa else None
        server_cpus, client_cpus = split or (None, None)
        all_cpus = sorted(os.sched_getaffinity(0))
        if split:
            pin_this_process(server_cpus)
            meta["pinning"] = (f"server and in-process references on CPU {','.join(map(str, server_cpus))}, "
                               f"perf_analyzer on CPU {','.join(map(str, client_cpus))}")
        http, grpc, metrics = free_ports(3)
        rows: list[Row] = []
        torch_threads = torch.get_num_threads()
        try:
            with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, require_all=True,
                              cpus=server_cpus) as server:
                meta["triton"] = "2.51"
                for m in [rep.FLOOR_MODEL, *served]:  # the floor first: every later number is read against it
                    log(f"{m}:")
                    r, note = bench_model(m, server, layout.onnx_path(m, repo), s, use_pa, log, client_cpus)
                    rows += r
                    if note:
                        notes.append(f"{m}: torch row uses {note} (no checkpoint)")
                meta["frontdoor"] = frontdoor_latency(server, served[0] if served else rep.FLOOR_MODEL,
                                                      s.frontdoor_requests, log)
                meta["large_responses"] = [
                    large_response_latency(server, m, s.large_response_requests, log) for m in served
                    if response_bytes(get_spec(m), 64) > LARGE_RESPONSE_BYTES
                    and get_spec(m).serving.max_batch_size >= 64]
        finally:
            if split:
                pin_this_process(all_cpus)
            torch.set_num_threads(torch_threads)  # bench_model sized torch's pool to the pinned cores
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if max(float(meta["loadavg"].split()[0]), os.getloadavg()[0]) > 0.5 * meta["cpus"]:
        notes.append(f"the host was busy with other work (load average {meta['loadavg']} at start, "
                     f"{meta['loadavg_end']} at the end, on {meta['cpus']} CPUs): server, clients and those "
                     "processes share the cores, so these numbers are noisy and throughput is understated")
    summary = summarize(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "settings": asdict(s), "summary": summary,
                                                    "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    write_markdown(out_dir / "bench.md", rows, summary, meta)
    with open(out_dir / "bench.md", "a") as f:
        f.write(frontdoor_markdown(meta["frontdoor"]))
        f.write(large_response_markdown(meta["large_responses"]))
    plot(out_dir / "bench.png", rows)
    return {"meta": meta, "summary": summary, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.served", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None, help="default: every exported model")
    p.add_argument("--repo", type=Path, default=None, help="where the exported graphs are (default: model_repository/)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: reports/)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--protocols", nargs="+", choices=("grpc", "http"), default=["grpc", "http"])
    p.add_argument("--tool", choices=("auto", "perf_analyzer", "python"), default="auto")
    p.add_argument("--intra-op-threads", type=int, default=None,
                   help="onnxruntime threads, served and in-process (default: the spec's serving setting)")
    p.add_argument("--max-queue-delay-us", type=int, default=None,
                   help="dynamic batching queue delay (default: the spec's serving setting)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not split the cores between the server (+ in-process references) and perf_analyzer")
    p.add_argument("--quick", action="store_true", help="short windows (a smoke run, noisier numbers)")
    p.add_argument("--untrained", action="store_true", help="export fresh untrained weights (no `make export` needed)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    s = Settings(concurrency=tuple(sorted(set(args.concurrency))), protocols=tuple(args.protocols), tool=args.tool,
                 intra_op_threads=args.intra_op_threads, pin=not args.no_pin,
                 max_queue_delay_us=args.max_queue_delay_us)
    if args.quick:
        s.window_ms, s.inprocess_s, s.frontdoor_requests, s.large_response_requests = 1000, 1.0, 50, 4
    try:
        from training import paths

        out = args.out or paths.REPORTS_DIR
        res = run(args.models, s, out, args.repo, args.untrained, log=lambda m: print(m, flush=True))
    except Exception as e:
        return cli_error(e, args.debug)
    summ = res["summary"]
    print(f"floor (p50, concurrency 1): {summ['floor_ms']}")
    failed = []
    for m, d in summ["models"].items():
        for proto in s.protocols:
            x = d.get(proto, {})
            print(f"{m:18s} {proto}: served p50 {x.get('served_p50_ms', float('nan')):.3f} ms vs onnxruntime "
                  f"{d['onnxruntime_p50_ms']:.3f} ms ({x.get('overhead_in_floors', float('nan')):.2f} floors); "
                  f"batching gain {x.get('batching_gain', float('nan')):.2f}x")
            failed += [f"{m}/{proto}/{k}" for k in ("latency_ok", "batching_ok") if x.get(k) is False]
    print(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}")
    # Missed targets are a measurement, not an error: say which plainly; exit non-zero only on errors.
    print(f"targets missed ({len(failed)}): {', '.join(failed)}" if failed else "targets: all met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
