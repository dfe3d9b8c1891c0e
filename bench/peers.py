"""``python -m bench.peers [models]`` (``make bench-peers``): the served engine against its peers, per host.

Per model at batch 1 and 32, on the same graphs and images: onnxruntime as the project configures it (spin-wait
off, ``export.runtime``), onnxruntime with spinning on, OpenVINO (``export.openvino_runner``: static shapes,
LATENCY hint, f32), torch eager, and torch.compile (inductor, static shapes). All are interleaved per round (each
timed call after an untimed one: ``export.host_choice.settled_interleaved``), p50/p95/p99 per call, and the ratio
onnxruntime's p50 / the peer's p50 (above 1: the peer is faster). The host's instruction set heads each section,
with the load average, since these 2-core hosts are shared.

``--emulate-avx2`` repeats the run in a subprocess under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``:
that holds torch (ATen and oneDNN) to AVX2; onnxruntime's MLAS kernels take no such setting and still dispatch
on the CPU's own flags, so only a real AVX2 host measures onnxruntime there. Sections are kept per instruction
set key in reports/peers.json, so runs on different hosts add up in one report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from training import paths
from training.cli import model_names

# Inductor compiles in a pool of worker processes that start in the background and then take the cores while
# the next runners are timed (measured: torch eager cnn at batch 1 150 ms instead of 1.6 ms): compile in process.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

BATCHES = (1, 32)
ROUNDS = 30
BASE = "onnxruntime"
PEERS = ("onnxruntime", "onnxruntime spin on", "openvino", "torch eager", "torch.compile")
COMPILE_BUDGET_S = 180.0  # torch.compile's first call per shape; past this the next shape is not compiled
EMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def runners_for(name: str, compile_: bool = True) -> tuple[dict[str, Any], dict[str, str], Any]:
    """Peer -> runner for one model (the compiled torch model is added per batch: static shapes), notes on the
    peers left out and why, and the torch model."""
    import torch

    from export.host_choice import cpu_runner
    from export.pipeline import graph_paths
    from export.runners import TorchRunner
    from export.runtime import intra_op_threads
    from training.checkpoints import load_trained
    from training.registry import get_spec

    spec = get_spec(name)
    torch.set_num_threads(intra_op_threads())
    model = load_trained(name)
    files = graph_paths(spec)
    runners: dict[str, Any] = {"onnxruntime": cpu_runner(spec, files, "onnxruntime", "spin off"),
                               "onnxruntime spin on": cpu_runner(spec, files, "onnxruntime", "spin on")}
    notes: dict[str, str] = {}
    try:
        runners["openvino"] = cpu_runner(spec, files, "openvino")
    except Exception as e:  # not installed, or the graph does not compile
        notes["openvino"] = _first_line(e)
    runners["torch eager"] = TorchRunner.for_spec(spec, model)
    if not compile_:
        notes["torch.compile"] = "not run (--no-compile)"
    return runners, notes, model


def _compiled(spec: Any, model: Any, feeds: dict, budget_left: float) -> tuple[Any, float]:
    """torch.compile (inductor, static shapes) warmed up on ``feeds``; its compile time in s."""
    import torch

    from export.runners import TorchRunner

    if budget_left <= 0:
        raise TimeoutError(f"not compiled: the first compile took past the {COMPILE_BUDGET_S:.0f} s budget")
    torch._dynamo.reset()  # one shape per compile; a recompile limit would otherwise fall back to eager silently
    r = TorchRunner.for_spec(spec, torch.compile(model, backend="inductor", dynamic=False), name="torch.compile")
    t0 = time.perf_counter()
    r.infer(feeds)
    return r, time.perf_counter() - t0


def bench_model(name: str, batches: tuple[int, ...] = BATCHES, rounds: int = ROUNDS, compile_: bool = True,
                progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    from export.host_choice import settled_interleaved
    from export.timing import batch_of
    from training.feeds import sample_feeds
    from training.registry import get_spec

    spec = get_spec(name)
    runners, notes, model = runners_for(name, compile_)
    feeds = sample_feeds(spec, max(batches), spec.train.canvas)
    out: dict[str, Any] = {"model": name, "rounds": rounds, "loadavg_before": list(os.getloadavg()),
                           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "notes": notes, "batches": {}, "compile_s": {}}
    budget = COMPILE_BUDGET_S
    bar = tqdm(total=rounds * len(batches), desc=f"peers {name}", disable=not progress, leave=False)
    for b in batches:
        x = batch_of(feeds, b)
        these = dict(runners)
        if compile_:
            try:
                these["torch.compile"], secs = _compiled(spec, model, x, budget)
                out["compile_s"][str(b)] = secs
                budget -= secs
            except Exception as e:
                notes["torch.compile"] = f"batch {b}: {_first_line(e)}"
        for k, r in list(these.items()):  # a static-shape compile (OpenVINO) happens at the first call
            try:
                r.infer(x)
            except Exception as e:
                notes[k] = f"batch {b}: {_first_line(e)}"
                del these[k]
        stats = settled_interleaved(these, x, rounds, progress=bar)
        base = stats[BASE]["p50"]
        out["batches"][str(b)] = {"latency": stats, "ratio": {k: base / s["p50"] for k, s in stats.items()}}
    bar.close()
    out["loadavg_after"] = list(os.getloadavg())
    return out


def section_header() -> dict[str, Any]:
    import torch

    from export.host_choice import isa_key
    from export.openvino_runner import version
    from training.fingerprint import host_fingerprint, isa_summary

    h = host_fingerprint()
    return {"isa_key": isa_key(h), "host": isa_summary(), "threads": h["torch_threads"],
            "versions": {"onnxruntime": h["onnxruntime"], "openvino": version(), "torch": torch.__version__},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run(names: list[str], batches: tuple[int, ...], rounds: int, compile_: bool) -> dict[str, Any]:
    section = {**section_header(), "loadavg": list(os.getloadavg()), "models": {}}
    for name in names:
        try:
            section["models"][name] = bench_model(name, batches, rounds, compile_)
        except Exception as e:
            print(f"error: model {name!r}: {_first_line(e)}", file=sys.stderr)
            continue
        r = section["models"][name]["batches"]
        print(f"{name}: " + "; ".join(f"b{b} " + ", ".join(f"{k} {v:.2f}" for k, v in r[str(b)]["ratio"].items()
                                                           if k != BASE) for b in batches), flush=True)
    return section


def render(data: dict[str, Any]) -> str:
    from export.markdown import md_table

    lines = ["# onnxruntime against its peers on this host's graphs", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "Generated by `python -m bench.peers` (`make bench-peers`); do not edit. Per cell: p50 / p95 / p99 ms "
             "per call; ratio = onnxruntime's p50 / the peer's p50 (above 1: the peer is faster).", ""]
    for key, s in data["sections"].items():
        la = s["loadavg"]
        lines += [f"## {key}", "", f"Host: {s['host']}; {s['threads']} threads; "
                  f"onnxruntime {s['versions']['onnxruntime']}, OpenVINO {s['versions']['openvino']}, "
                  f"torch {s['versions']['torch']}; latest run {s['measured_at']} under load average "
                  f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs.", ""]
        ratios, cells = [], []
        for name, m in s["models"].items():
            for b, row in m["batches"].items():
                lat = row["latency"]
                cells.append([name, b, *[f"{lat[p]['p50']:.2f} / {lat[p]['p95']:.2f} / {lat[p]['p99']:.2f}"
                                         if p in lat else "-" for p in PEERS]])
                ratios.append([name, b, *[f"{row['ratio'][p]:.2f}" if p in row["ratio"] else "-"
                                          for p in PEERS if p != BASE],
                               f"{m['loadavg_before'][0]:.1f} -> {m['loadavg_after'][0]:.1f}"
                               + (f" ({m['measured_at'][11:16]}Z)" if "measured_at" in m else "")])
        lines += ["### Ratio onnxruntime / peer (p50)", "",
                  md_table(["model", "batch", *[p for p in PEERS if p != BASE], "load (1 min) before -> after (when)"],
                           ratios), "", "### Latency", "", md_table(["model", "batch", *PEERS], cells), ""]
        notes = [f"- {name}: {peer}: {why}" for name, m in s["models"].items() for peer, why in m["notes"].items()]
        compile_s = [f"{name} " + ", ".join(f"b{b} {v:.0f} s" for b, v in m["compile_s"].items())
                     for name, m in s["models"].items() if m["compile_s"]]
        if compile_s:
            lines += ["torch.compile's first call (compile) per shape: " + "; ".join(compile_s) + ".", ""]
        if notes:
            lines += ["Left out:", "", *notes, ""]
    return "\n".join(lines)


def write(section: dict[str, Any], path: Path | None = None) -> Path:
    from export.markdown import with_host_line

    path = path or paths.REPORTS_DIR / "peers.json"
    data = json.loads(path.read_text()) if path.is_file() else {"sections": {}}
    old = data["sections"].get(section["isa_key"], {}).get("models", {})
    data["sections"][section["isa_key"]] = {**section, "models": dict(sorted({**old, **section["models"]}.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    path.with_suffix(".md").write_text(with_host_line(render(data)))
    return path


def emulated(argv: list[str]) -> dict[str, Any]:
    """This module's run in a subprocess held to AVX2 (``EMULATED_AVX2``); its section."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "section.json"
        subprocess.run([sys.executable, "-m", "bench.peers", *argv, "--section-out", str(out)],
                       env={**os.environ, **EMULATED_AVX2}, check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"])
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles per shape)")
    p.add_argument("--emulate-avx2", action="store_true", help="also run held to AVX2 (ATEN_CPU_CAPABILITY, "
                                                               "ONEDNN_MAX_CPU_ISA) in a subprocess")
    p.add_argument("--section-out", type=Path, help=argparse.SUPPRESS)  # the emulated subprocess's result
    p.add_argument("--out", type=Path, default=None, help="JSON report (default reports/peers.json; .md beside)")
    a = p.parse_args(argv)
    names = model_names(a.models)
    if names is None:
        return 2
    opts = ["--batches", *map(str, a.batches), "--rounds", str(a.rounds), *(["--no-compile"] if a.no_compile else [])]
    section = run(names, tuple(a.batches), a.rounds, not a.no_compile)
    if a.section_out:
        a.section_out.write_text(json.dumps(section))
        return 0 if section["models"] else 1
    if not section["models"]:
        print("error: nothing measured; run `make export` first", file=sys.stderr)
        return 1
    path = write(section, a.out)
    if a.emulate_avx2:
        path = write(emulated([*names, *opts]), a.out)
    print(f"wrote {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
