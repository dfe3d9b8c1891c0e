"""``python -m bench.peers [models]`` (``make bench-peers``): the served engine against its peers, per host.

Per model at batch 1 and 32, on the same graphs and images: the engine this host serves (the repository stamp's
fp32 choice: onnxruntime or OpenVINO with its threading setting, ``export.host_choice``), onnxruntime as the
project configures it without a choice (spin-wait off), OpenVINO with static shapes (``export.openvino_runner``:
LATENCY hint, f32, compiled per shape), torch eager and torch.compile (inductor, static shapes). All are
interleaved per round in a shuffled order (each timed call after an untimed one, and a 50 ms pause after each
torch call and each call of a spinning served session, whose threads otherwise slow whatever runs next:
``export.timing.interleaved``), p50/p95/p99
per call, and the ratio served p50 / peer p50 (above 1: the peer is faster). ``--runs`` repeats the whole set; the
verdict per model and batch is the median over runs of served / the faster of OpenVINO and torch.compile, held to
``NOISE`` (1.05). The host's instruction set heads each section, with the load average, since these 2-core hosts
are shared.

``--emulate-avx2`` repeats the run in a subprocess held to AVX2: by ``bench.cpuid_mask`` where the host can fault
on CPUID (every library then runs its AVX2 kernels: onnxruntime's MLAS, OpenVINO, oneDNN, torch, glibc), else by
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, which holds only torch and oneDNN. The repository's choice
must have been made for the same instruction set (``make repository`` run the same way), else the section says
so. Sections are kept per instruction set key in reports/peers.json, so runs on different hosts add up in one
report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from export.host_choice import served_label
from training import paths
from training.cli import model_names

# Inductor compiles in a pool of worker processes that start in the background and then take the cores while
# the next runners are timed (measured: torch eager cnn at batch 1 150 ms instead of 1.6 ms): compile in process.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

SCHEMA = 2
BATCHES = (1, 32)
ROUNDS = 30
MIN_ROUNDS = 5
ROUND_BUDGET_S = 60.0  # timed rounds per model and batch; slow peers (torch on feedback: ~2 s a call) get fewer
BASE = "served"
PEERS = ("served", "onnxruntime", "openvino", "torch eager", "torch.compile")
RIVALS = ("openvino", "torch.compile")  # the bar: served no slower than the faster of these
NOISE = 1.05
COMPILE_BUDGET_S = 180.0  # torch.compile's first call per shape; past this the next shape is not compiled
EMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def served_choice(name: str) -> dict[str, Any]:
    """The fp32 engine, setting and any routes by batch size the repository serves ``name`` with (its stamp),
    else the project default; ``label`` names it (``export.host_choice.served_label``)."""
    from export.host_choice import DEFAULT
    from serving.repository import stamped_choices

    fp32 = (stamped_choices().get(name) or {}).get("fp32") or {}
    if "engine" in fp32:
        choice = {k: fp32[k] for k in ("engine", "setting", "routes") if k in fp32} | {"from": "repository stamp"}
    else:
        choice = {"engine": DEFAULT[0], "setting": DEFAULT[2], "from": "default (no stamped choice)"}
    return choice | {"label": served_label(choice)}


def runners_for(name: str, compile_: bool = True) -> tuple[dict[str, Any], dict[str, str], Any, dict[str, str]]:
    """Peer -> runner for one model (the compiled torch model is added per batch: static shapes), notes on the
    peers left out and why, the torch model, and the served choice."""
    import torch

    from export.host_choice import cpu_runner, served_runner
    from export.pipeline import graph_paths
    from export.runners import TorchRunner
    from export.runtime import intra_op_threads
    from training.checkpoints import load_trained
    from training.registry import get_spec

    spec = get_spec(name)
    torch.set_num_threads(intra_op_threads())
    model = load_trained(name)
    files = graph_paths(spec)
    choice = served_choice(name)
    runners: dict[str, Any] = {"served": served_runner(spec, files, choice),
                               "onnxruntime": cpu_runner(spec, files, "onnxruntime", "spin off")}
    notes: dict[str, str] = {}
    try:
        runners["openvino"] = cpu_runner(spec, files, "openvino", "static")
    except Exception as e:  # not installed, or the graph does not compile
        notes["openvino"] = _first_line(e)
    runners["torch eager"] = TorchRunner.for_spec(spec, model)
    if not compile_:
        notes["torch.compile"] = "not run (--no-compile)"
    return runners, notes, model, choice


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


def _warm_call_s(runners: dict[str, Any], feeds: dict, notes: dict[str, str], batch: int) -> float:
    """One warm-up call of each runner (a static-shape compile happens here); drops the ones that fail. Returns
    the slowest runner's time of a second call, which sizes the rounds."""
    for k, r in list(runners.items()):
        try:
            r.infer(feeds)
        except Exception as e:
            notes[k] = f"batch {batch}: {_first_line(e)}"
            del runners[k]
    t0 = time.perf_counter()
    for r in runners.values():
        r.infer(feeds)
    return time.perf_counter() - t0


def bench_model(name: str, batches: tuple[int, ...] = BATCHES, rounds: int = ROUNDS, compile_: bool = True,
                progress: bool = True) -> dict[str, Any]:
    """One run of every peer on ``name`` at each batch."""
    from tqdm import tqdm

    from export.host_choice import routes_of, settled_interleaved
    from export.timing import BUSY_IDLE_S, batch_of
    from training.feeds import sample_feeds
    from training.registry import get_spec

    spec = get_spec(name)
    runners, notes, model, choice = runners_for(name, compile_)
    # torch's OpenMP pool and a spinning served session keep the cores busy after they return (export.timing)
    busy = {k: BUSY_IDLE_S for k in (*runners, "torch.compile")
            if k.startswith("torch") or (k == BASE and any(r.setting == "spin on" for r in routes_of(choice)))}
    feeds = sample_feeds(spec, max(batches), spec.train.canvas)
    out: dict[str, Any] = {"model": name, "served": choice, "loadavg_before": list(os.getloadavg()),
                           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "notes": notes, "batches": {}, "compile_s": {}, "rounds": {}}
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
        per_round = 2 * _warm_call_s(these, x, notes, b)  # settled: two calls per runner per round
        n = max(MIN_ROUNDS, min(rounds, int(ROUND_BUDGET_S / max(per_round, 1e-9))))
        out["rounds"][str(b)] = n
        stats = settled_interleaved(these, x, n, progress=bar, idle_after=busy)
        bar.update(rounds - n)
        base = stats[BASE]["p50"]
        out["batches"][str(b)] = {"latency": stats, "ratio": {k: base / s["p50"] for k, s in stats.items()}}
    bar.close()
    out["loadavg_after"] = list(os.getloadavg())
    return out


def verdict(runs: list[dict[str, Any]], batch: str) -> dict[str, Any] | None:
    """Served p50 / the faster rival's p50 per run, their median, and whether it is within ``NOISE``; None when no
    rival was measured."""
    ratios = []
    for r in runs:
        row = r["batches"].get(batch)
        rivals = [row["latency"][k]["p50"] for k in RIVALS if row and k in row["latency"]]
        if rivals:
            ratios.append(row["latency"][BASE]["p50"] / min(rivals))
    if not ratios:
        return None
    med = statistics.median(ratios)
    return {"ratios": ratios, "median": med, "within_noise": med <= NOISE}


def section_header() -> dict[str, Any]:
    import torch

    from export.host_choice import isa_key
    from export.openvino_runner import version
    from serving.repository import read_stamp
    from training.fingerprint import host_fingerprint, isa_summary

    h = host_fingerprint()
    # the host choice the repository was generated with: another instruction set's makes the table say little
    return {"isa_key": isa_key(h), "host": isa_summary(), "threads": h["torch_threads"],
            "chosen_for": (read_stamp() or {}).get("isa_key"),
            "versions": {"onnxruntime": h["onnxruntime"], "openvino": version(), "torch": torch.__version__},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run(names: list[str], batches: tuple[int, ...], rounds: int, compile_: bool, runs: int = 1) -> dict[str, Any]:
    """``runs`` passes over every model (a pass finishes all models before the next starts, so a burst of load on
    the shared host falls on one run of a model, not on both)."""
    section = {**section_header(), "loadavg": list(os.getloadavg()), "runs": runs, "models": {}}
    for i in range(runs):
        for name in names:
            try:
                one = bench_model(name, batches, rounds, compile_)
            except Exception as e:
                print(f"error: model {name!r}: {_first_line(e)}", file=sys.stderr)
                continue
            m = section["models"].setdefault(name, {"served": one["served"], "runs": []})
            m["runs"].append(one)
            print(f"run {i + 1}/{runs} {name} (served: {served_label(one['served'])}): "
                  + "; ".join(f"b{b} " + ", ".join(f"{k} {v:.2f}" for k, v in one["batches"][str(b)]["ratio"].items()
                                                    if k != BASE) for b in batches if str(b) in one["batches"]),
                  flush=True)
    for m in section["models"].values():
        m["verdict"] = {b: verdict(m["runs"], b) for b in m["runs"][-1]["batches"]}
    return section


def _cell(lat: dict[str, dict[str, float]], p: str) -> str:
    return f"{lat[p]['p50']:.2f} / {lat[p]['p95']:.2f} / {lat[p]['p99']:.2f}" if p in lat else "-"


def _median_ratio(runs: list[dict[str, Any]], batch: str, peer: str) -> str:
    got = [r["batches"][batch]["ratio"][peer] for r in runs if peer in r["batches"].get(batch, {}).get("ratio", {})]
    return f"{statistics.median(got):.2f}" if got else "-"


def _verdict_cell(v: dict[str, Any] | None) -> str:
    if v is None:
        return "no rival measured"
    mark = "yes" if v["within_noise"] else "**no**"
    return f"{v['median']:.2f} ({', '.join(f'{r:.2f}' for r in v['ratios'])}): {mark}"


def render_section(key: str, s: dict[str, Any]) -> list[str]:
    from export.markdown import md_table

    la = s["loadavg"]
    lines = [f"## {key}", "", f"Host: {s['host']}; {s['threads']} threads; onnxruntime {s['versions']['onnxruntime']}, "
             f"OpenVINO {s['versions']['openvino']}, torch {s['versions']['torch']}; latest run {s['measured_at']} "
             f"under load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs; "
             f"{s.get('runs', 1)} run(s) per model.", ""]
    if "chosen_for" in s and s["chosen_for"] != key:  # (sections written before it was recorded: not known)
        lines += [f"**The repository's engines were chosen for {s.get('chosen_for') or 'no host'}, not this "
                  f"instruction set**: regenerate it here (`make repository`) before reading the verdicts.", ""]
    verdicts, ratios, cells = [], [], []
    for name, m in s["models"].items():
        last = m["runs"][-1]
        served = served_label(m["served"])
        for b, row in last["batches"].items():
            verdicts.append([name, b, served, _verdict_cell(m["verdict"].get(b))])
            ratios.append([name, b, *[_median_ratio(m["runs"], b, p) for p in PEERS if p != BASE],
                           f"{last['loadavg_before'][0]:.1f} -> {last['loadavg_after'][0]:.1f} "
                           f"({last['measured_at'][11:16]}Z)"])
            cells.append([name, b, *[_cell(row["latency"], p) for p in PEERS]])
    met = sum(1 for v in verdicts if v[3].endswith(": yes"))
    lines += [f"### Served no slower than the faster of OpenVINO and torch.compile: {met} of {len(verdicts)}", "",
              f"Served p50 / min(OpenVINO p50, torch.compile p50), the median over runs (each run's in brackets); "
              f"within the noise when <= {NOISE}.", "",
              md_table(["model", "batch", "served engine", "served / fastest rival"], verdicts), "",
              "### Ratio served / peer (p50, median over runs)", "",
              md_table(["model", "batch", *[p for p in PEERS if p != BASE], "load (1 min) before -> after (when)"],
                       ratios), "", "### Latency (last run)", "", md_table(["model", "batch", *PEERS], cells), ""]
    notes = [f"- {name}: {peer}: {why}" for name, m in s["models"].items()
             for peer, why in m["runs"][-1]["notes"].items()]
    compile_s = [f"{name} " + ", ".join(f"b{b} {v:.0f} s" for b, v in m["runs"][-1]["compile_s"].items())
                 for name, m in s["models"].items() if m["runs"][-1]["compile_s"]]
    if compile_s:
        lines += ["torch.compile's first call (compile) per shape: " + "; ".join(compile_s) + ".", ""]
    if notes:
        lines += ["Left out:", "", *notes, ""]
    return lines


def render(data: dict[str, Any]) -> str:
    lines = ["# The served engine against its peers, per host", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "Generated by `python -m bench.peers` (`make bench-peers`); do not edit. Per latency cell: p50 / p95 / "
             "p99 ms per call; ratio = served p50 / peer p50 (above 1: the peer is faster).", ""]
    for key, s in data["sections"].items():
        lines += render_section(key, s)
    return "\n".join(lines)


def write(section: dict[str, Any], path: Path | None = None) -> Path:
    """Merge ``section`` into the report (per instruction-set key; per model, the newest runs replace older ones) and
    write its markdown beside it. A report in an older layout is started afresh."""
    from export.markdown import with_host_line

    path = path or paths.REPORTS_DIR / "peers.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("schema") != SCHEMA:
        data = {"schema": SCHEMA, "sections": {}}
    old = data["sections"].get(section["isa_key"], {}).get("models", {})
    data["sections"][section["isa_key"]] = {**section, "models": dict(sorted({**old, **section["models"]}.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    path.with_suffix(".md").write_text(with_host_line(render(data)))
    return path


def held_to_avx2_environment() -> dict[str, str]:
    """The environment that holds a subprocess to AVX2: the CPUID mask where this host can fault on CPUID, else
    the variables that hold torch and oneDNN (``EMULATED_AVX2``)."""
    from bench import cpuid_mask

    return cpuid_mask.environment() if cpuid_mask.unavailable() is None else {**os.environ, **EMULATED_AVX2}


def emulated(argv: list[str]) -> dict[str, Any]:
    """This module's run in a subprocess held to AVX2 (``held_to_avx2_environment``); its section."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "section.json"
        subprocess.run([sys.executable, "-m", "bench.peers", *argv, "--section-out", str(out)],
                       env=held_to_avx2_environment(), check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"])
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--runs", type=int, default=2, help="passes over every model; the verdict is their median")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles per shape)")
    p.add_argument("--emulate-avx2", action="store_true", help="also run held to AVX2 in a subprocess "
                                                               "(bench.cpuid_mask, else ATEN_CPU_CAPABILITY)")
    p.add_argument("--section-out", type=Path, help=argparse.SUPPRESS)  # the emulated subprocess's result
    p.add_argument("--out", type=Path, default=None, help="JSON report (default reports/peers.json; .md beside)")
    a = p.parse_args(argv)
    names = model_names(a.models)
    if names is None:
        return 2
    opts = ["--batches", *map(str, a.batches), "--rounds", str(a.rounds), "--runs", str(a.runs),
            *(["--no-compile"] if a.no_compile else [])]
    section = run(names, tuple(a.batches), a.rounds, not a.no_compile, a.runs)
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
