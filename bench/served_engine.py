"""The served engine before and after the host choice, measured served: each model's config as the repository
serves it (engine, shapes, spin-wait, instances, warm-up: ``make repository``) against the project's default
(onnxruntime fp32, spin-wait off, one instance), both loaded side by side in one tritonserver and alternated
request window by request window: p50/p95/p99 at concurrency 1 and throughput at concurrency 16, batch-1 requests
through the dynamic batcher (at c=16 it forms batches of every size, which a static-shape engine pads up to its
buckets: that cost is in the figures).

    python -m bench.served_engine [MODEL ...] [--duration S] [--rounds N]

Models: by default the single-graph ones whose served fp32 config differs from the default. Writes
``reports/served_engine.{md,json}``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import bench_parser
from bench.variants_served import bench_model
from export.markdown import md_table, with_host_line
from serving.cli import cli_error

DEFAULT, SERVED = "default", "served"


def served_fp32(choices: dict[str, Any], name: str) -> tuple[str, int]:
    """(engine and setting or routes by batch size, instances) of ``name``'s fp32 model in the stamp's
    ``choices``."""
    from export.host_choice import served_label

    fp32 = (choices.get(name) or {}).get("fp32") or {}
    return (served_label(fp32) if "engine" in fp32 else "?"), fp32.get("instances") or 1


def changed_models() -> list[str]:
    """Single-graph models whose stamped fp32 config is not onnxruntime with spin-wait off and one instance."""
    from serving.repository import spec_for, stamped_choices

    choices = stamped_choices()
    return [n for n in choices if served_fp32(choices, n) != ("onnxruntime spin off", 1)
            and spec_for(n).composition is None]


def write_pair(name: str, root: Path) -> dict[str, str]:
    """``<name>__default`` (the generator's config before any host choice) and ``<name>__served`` (the
    repository's config as served) in ``root``, on the same graph: setting -> Triton model name."""
    from serving.repository import BACKEND_MODEL_PY, config_text, copy_file, graph_config, parse_config, spec_for
    from training import layout

    served = parse_config(layout.config_path(name).read_text())
    default = graph_config(spec_for(name), None, "cpu")
    out = {}
    for setting, cfg in ((DEFAULT, default), (SERVED, served)):
        cfg.name = f"{name}__{setting}"
        folder = layout.version_dir(cfg.name, root)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / layout.ONNX_FILE).symlink_to(layout.onnx_path(name).resolve())
        copy_file(BACKEND_MODEL_PY, folder / layout.BACKEND_FILE)
        layout.config_path(cfg.name, root).write_text(config_text(cfg))
        out[setting] = cfg.name
    return out


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    rows = []
    for name, r in results.items():
        d1, s1, d16, s16 = r["1"][DEFAULT], r["1"][SERVED], r["16"][DEFAULT], r["16"][SERVED]
        rows.append([name, r["served_as"], f"{d1['p50']:.2f} / {d1['p95']:.2f} / {d1['p99']:.2f}",
                     f"{s1['p50']:.2f} / {s1['p95']:.2f} / {s1['p99']:.2f}", f"{d1['p50'] / s1['p50']:.2f}x",
                     f"{d16['rps']:.0f} -> {s16['rps']:.0f}", f"{s16['rps'] / d16['rps']:.2f}x",
                     f"{r.get('measured_at', '-')}, load {r.get('loadavg', '-')}"])
    return with_host_line("\n".join([
        "# The served engine before and after the host choice", "",
        f"tritonserver (python backend), gRPC, batch-1 requests, the dynamic batcher on; per model the default "
        f"config (onnxruntime fp32, spin-wait off, 1 instance) and the config `make repository` serves on this "
        f"host, side by side in one server, alternated {meta['rounds']} times over {meta['duration']} s per "
        f"concurrency; each model's row with its time and the load average (1 / 5 / 15 min) before it. Generated "
        f"by `python -m bench.served_engine` (a run on some models keeps the others' rows); above 1x is better.", "",
        md_table(["model", "served as", "default c=1 p50 / p95 / p99 ms", "served c=1 p50 / p95 / p99 ms",
                  "c=1 p50 speed-up", "c=16 req/s default -> served", "c=16 throughput ratio", "measured"], rows),
        ""]))


def run(models: list[str], duration: float, rounds: int, out_dir: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from serving.repository import stamped_choices
    from serving.server import TritonServer, free_ports

    choices = stamped_choices()
    results = {}
    for m in tqdm(models, desc="served engine"):
        root = Path(tempfile.mkdtemp(prefix="attnzoo-engine-"))
        try:
            pair = write_pair(m, root)
            http, grpc, metrics = free_ports(3)
            with TritonServer(root, list(pair.values()), http_port=http, grpc_port=grpc, metrics_port=metrics,
                              require_all=True) as server:
                print(f"{m}:", file=sys.stderr)
                label, instances = served_fp32(choices, m)
                loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
                results[m] = {**bench_model(server, m, pair, duration, rounds),
                              "served_as": f"{label} x{instances}", "loadavg": loadavg,
                              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        finally:
            shutil.rmtree(root, ignore_errors=True)
    served_as = {m: "{} x{}".format(*served_fp32(choices, m)) for m in choices}
    write_report(out_dir, results, {"duration": duration, "rounds": rounds}, served_as)
    return results


def write_report(out_dir: Path, results: dict[str, Any], meta: dict[str, Any],
                 served_as: dict[str, str] | None = None) -> dict[str, Any]:
    """``served_engine.{json,md}`` in ``out_dir`` with ``results`` added: models measured before and not now keep
    their rows (a run on a few models adds to the table) while the row still describes what is served
    (``served_as``: model -> its current label; None: keep every row). Returns every row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "served_engine.json"
    before = json.loads(path.read_text()) if path.is_file() else {}
    load = before.get("meta", {}).get("loadavg", "-")  # rows written before each row had its own
    old = {m: {"loadavg": load, **r} for m, r in before.get("results", {}).items()
           if served_as is None or served_as.get(m) == r.get("served_as")}
    merged = dict(sorted({**old, **results}.items()))
    path.write_text(json.dumps({"meta": meta, "results": merged}, indent=1) + "\n")
    (out_dir / "served_engine.md").write_text(render(merged, meta))
    return merged


def main(argv: list[str] | None = None) -> int:
    from training import paths
    from training.cli import model_names

    p = bench_parser("python -m bench.served_engine", __doc__, "seconds per concurrency and config", 4,
                     "alternations of the two configs")
    p.set_defaults(models=[], duration=16.0)
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    names = model_names(a.models) if a.models else changed_models()
    if names is None:  # an unknown model name (model_names said which)
        return 2
    if not names:
        print("nothing to compare: every single-graph model is served with the default config", file=sys.stderr)
        return 0
    try:
        run(names, a.duration, a.rounds, paths.REPORTS_DIR)
    except Exception as e:
        return cli_error(e, a.debug)
    print(f"wrote {paths.REPORTS_DIR / 'served_engine.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
