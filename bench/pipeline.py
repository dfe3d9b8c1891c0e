"""Composed pipelines served both ways: every model with a composition (its graphs chained by Triton) is served
as an ensemble and as the generic BLS python model over the same graph models, timed over gRPC with the two
interleaved, plus each Triton model's share of the time from Triton's statistics extension (per model: requests,
executions, queue and compute time per request). Names the faster composition per concurrency. Writes
``reports/pipeline_<name>.{md,json}``.

    python -m bench.pipeline [MODEL ...] [--duration S] [--rounds N]   (needs `make export`)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import bench_parser, example_inputs, measure_callable
from export.markdown import with_host_line
from serving.cli import cli_error

KINDS = ("ensemble", "bls")
CONCURRENCY = (1, 8)
BATCHES = (1, 8)
STAT_FIELDS = ("queue", "compute_input", "compute_infer", "compute_output")


def composed_names(spec: Any) -> dict[str, str]:
    """Composition kind -> Triton model: the spec's own kind under its name, the other as ``<name>_<kind>``."""
    own = spec.composition.kind
    return {k: spec.name if k == own else f"{spec.name}_{k}" for k in KINDS}


def write_both(spec: Any, root: Path, graphs_from: Path) -> dict[str, str]:
    """A repository at ``root`` serving ``spec`` (its graphs linked from ``graphs_from``) composed both ways."""
    from serving import repository as rep
    from training import layout
    from training.registry import Composition

    for g in spec.deploy_graphs():
        name = spec.graph_model_name(g)
        src = layout.onnx_path(name, graphs_from)
        if not src.exists():
            raise FileNotFoundError(f"model {spec.name!r}: missing {src} (run `python -m export {spec.name}`)")
        dst = layout.onnx_path(name, root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src.resolve())
    rep.write_model(spec, "cpu", root)
    names = composed_names(spec)
    for kind, triton in names.items():
        if triton == spec.name:
            continue
        other = dataclasses.replace(spec, composition=Composition(kind, spec.composition.steps))
        cfg = rep.composition_config(other)
        cfg.name = triton
        rep.write_text(layout.config_path(triton, root), rep.config_text(cfg))
        if kind == "bls":
            rep.copy_file(rep.BACKEND_PIPELINE_PY, layout.version_dir(triton, root) / layout.BACKEND_FILE)
        else:
            layout.version_dir(triton, root).mkdir(parents=True, exist_ok=True)
    return names


def model_stats(server: Any, models: list[str]) -> dict[str, dict[str, float]]:
    """Triton's cumulative statistics per model: request and execution counts and the time fields (ns)."""
    from serving.server import http_json

    out = {}
    for m in models:
        status, body = http_json("GET", f"http://{server.http_url}/v2/models/{m}/stats")
        if status != 200:
            raise RuntimeError(f"statistics of model {m!r}: HTTP {status} {body}")
        s = body["model_stats"][0]
        inf = s.get("inference_stats", {})
        out[m] = {"requests": float(inf.get("success", {}).get("count", 0)),
                  "executions": float(s.get("execution_count", 0)),
                  **{f: float(inf.get(f, {}).get("ns", 0)) for f in STAT_FIELDS}}
    return out


def _delta(after: dict, before: dict) -> dict:
    return {m: {k: after[m][k] - before[m][k] for k in after[m]} for m in after}


def _add(total: dict, d: dict) -> None:
    for m, v in d.items():
        acc = total.setdefault(m, dict.fromkeys(v, 0.0))
        for k, x in v.items():
            acc[k] += x


def bench(server: Any, spec: Any, names: dict[str, str], duration: float, rounds: int) -> dict[str, Any]:
    """Per (batch, concurrency): each composition's p50/p95/p99 ms and req/s (interleaved rounds), and per
    composition the statistics delta of every Triton model its requests ran through."""
    from serving.client import Client

    steps = [spec.graph_model_name(g) for g in spec.deploy_graphs()]
    clients = {k: Client(m, "grpc", server.grpc_url) for k, m in names.items()}
    timings: dict[str, Any] = {}
    stats: dict[str, dict[str, dict]] = {}  # case -> composition -> Triton model -> summed statistics
    for b in BATCHES:
        feeds = example_inputs(spec, b)
        for c in CONCURRENCY:
            lat: dict[str, list] = {k: [] for k in names}
            case_stats: dict[str, dict] = stats.setdefault(f"b{b}_c{c}", {k: {} for k in names})
            for _ in range(rounds):
                for k, client in clients.items():
                    before = model_stats(server, [names[k], *steps])
                    lat[k].append(measure_callable(lambda cl=client: cl.infer(feeds, validate=False), c,
                                                   duration / rounds, warmup=2)[:4])
                    _add(case_stats[k], _delta(model_stats(server, [names[k], *steps]), before))
            timings[f"b{b}_c{c}"] = {k: {f: sum(r[i] for r in rs) / len(rs)
                                         for i, f in enumerate(("p50", "p95", "p99", "rps"))} for k, rs in lat.items()}
            for k, r in timings[f"b{b}_c{c}"].items():
                print(f"  {names[k]:20s} batch {b} c={c}: p50 {r['p50']:7.2f} ms {r['rps']:7.1f} req/s",
                      file=sys.stderr)
    for c in clients.values():
        c.close()
    per_model = {case: {k: {m: {"requests": v["requests"], "executions": v["executions"],
                                **{f"{f}_ms": v[f] / max(v["requests"], 1) / 1e6 for f in STAT_FIELDS}}
                            for m, v in st.items()} for k, st in by_kind.items()} for case, by_kind in stats.items()}
    faster = {case: max(t, key=lambda k: t[k]["rps"]) for case, t in timings.items()}
    return {"served": names, "default": spec.composition.kind, "timings": timings, "steps": per_model,
            "faster": faster}


def render(name: str, r: dict[str, Any], duration: float, rounds: int) -> str:
    lines = [f"# {name}: ensemble vs BLS", "",
             "Generated by `python -m bench.pipeline`; do not edit. Triton 2.51 (python backend, onnxruntime "
             f"CPU) over gRPC, the same graph models composed by Triton's ensemble scheduler and by the generic BLS "
             f"model (serving/backend/pipeline.py), {duration:g} s per composition and case in {rounds} interleaved "
             "rounds; client, server and models share this host's 2 cores. Latency ms p50 / p95 / p99 and "
             f"requests/s; **bold**: the faster. Served by default: **{r['default']}** (the spec's composition).", "",
             "| request batch | concurrency | " + " | ".join(f"{k} ({r['served'][k]})" for k in KINDS) + " |",
             "|---|---|" + "---|" * len(KINDS)]
    for case, t in r["timings"].items():
        b, c = case[1:].split("_c")
        cells = []
        for k in KINDS:
            x = t[k]
            cell = f"{x['p50']:.2f} / {x['p95']:.2f} / {x['p99']:.2f} ({x['rps']:.1f}/s)"
            cells.append(f"**{cell}**" if r["faster"][case] == k else cell)
        lines.append(f"| {b} | {c} | " + " | ".join(cells) + " |")
    lines += ["", "Per-step breakdown (Triton's statistics extension, over each case's requests): per request of "
              "each Triton model, the mean queue time and compute time (input + infer + output) in ms, and the mean "
              "requests per execution (the dynamic batcher's merging).", "",
              "| request batch | concurrency | composition | Triton model | requests | requests / execution | "
              "queue ms | compute ms | of which infer ms |", "|---|---|---|---|---|---|---|---|---|"]
    for case, by_kind in r["steps"].items():
        b, c = case[1:].split("_c")
        for k in KINDS:
            for m, v in by_kind[k].items():
                compute = v["compute_input_ms"] + v["compute_infer_ms"] + v["compute_output_ms"]
                per_exec = v["requests"] / v["executions"] if v["executions"] else float("nan")
                lines.append(f"| {b} | {c} | {k} | {m} | {int(v['requests'])} | {per_exec:.2f} | "
                             f"{v['queue_ms']:.2f} | {compute:.2f} | {v['compute_infer_ms']:.2f} |")
    lines += ["", "The composing model's own row is the whole pipeline as its requests saw it (an ensemble's compute "
              "is the sum of its steps'; BLS's includes its python stub's calls to the steps)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from export.cli_loop import parse
    from serving.server import TritonServer, free_ports
    from training import layout, paths
    from training.registry import get_spec

    p = bench_parser("python -m bench.pipeline", __doc__, "seconds per composition and case", 2,
                     "interleaved rounds the duration is split into")
    a, names = parse(p, argv)
    if names is None:
        return 2
    specs = [get_spec(n) for n in names if get_spec(n).composition is not None]
    if not specs:
        print("error: none of these models is composed of several graphs", file=sys.stderr)
        return 2
    out = paths.REPORTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    try:
        for spec in specs:
            with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
                served = write_both(spec, Path(tmp), layout.repository_root(a.repo))
                http, grpc, metrics = free_ports(3)
                with TritonServer(Path(tmp), http_port=http, grpc_port=grpc, metrics_port=metrics,
                                  require_all=True) as server:
                    print(f"{spec.name}:", file=sys.stderr)
                    r = bench(server, spec, served, a.duration, a.rounds)
            (out / f"pipeline_{spec.name}.json").write_text(json.dumps(r, indent=2) + "\n")
            (out / f"pipeline_{spec.name}.md").write_text(with_host_line(render(spec.name, r, a.duration, a.rounds)))
            print(f"wrote {out / f'pipeline_{spec.name}.md'}")
    except Exception as e:
        return cli_error(e, a.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
