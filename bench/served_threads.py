"""Spin-waiting and instances chosen by served measurement: each model served by a real tritonserver with
onnxruntime's intra-op spin-wait off and on, and with 1 and 2 instances, all settings of a model loaded side by
side as separate Triton models and alternated request window by request window (the ratios are measured in one
run, not minutes apart): p50/p95/p99 at concurrency 1 and throughput at concurrency 16, batch-1 requests through
the dynamic batcher.

The verdicts (``choose``): per model, the setting with the best p50 at concurrency 1 among those more than
``MARGIN`` faster there than the project's default (spin off, one instance) that keep its concurrency-16
throughput within ``MARGIN``; host-wide, for models not measured, a setting replaces the default only when it
improves p50 at concurrency 1 by more than ``MARGIN`` on most models and costs no model more than ``MARGIN`` of its
throughput. Recorded per host instruction set beside the host choice
(``export.host_choice.record_served_threading``), which the repository generator applies.
Writes ``reports/served_threads.{md,json}``.

    python -m bench.served_threads [MODEL ...] [--duration S] [--rounds N]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import bench_parser
from bench.variants_served import CONCURRENCY, bench_model
from export.markdown import md_table, with_host_line
from serving.cli import cli_error

DEFAULT_MODELS = ("all",)  # every single-graph model (composed ones get the host-wide verdict)
SETTINGS = {"spin off x1": (False, 1), "spin on x1": (True, 1), "spin off x2": (False, 2), "spin on x2": (True, 2)}
DEFAULT_SETTING = "spin off x1"
MARGIN = 1.05


def _slug(setting: str) -> str:
    return setting.replace(" ", "_")


def write_variants(name: str, root: Path) -> dict[str, str]:
    """One Triton model per setting of ``name``'s single graph in ``root``: setting -> Triton model name."""
    from tritonclient.grpc import model_config_pb2 as mc

    from serving.repository import BACKEND_MODEL_PY, config_text, copy_file, graph_config, spec_for
    from training import layout

    spec = spec_for(name)
    if spec.composition is not None:
        raise ValueError(f"model {name!r} composes several graphs; pick single-graph models")
    out = {}
    for setting, (spin, instances) in SETTINGS.items():
        cfg = graph_config(spec, None, "cpu")
        cfg.name = f"{name}__{_slug(setting)}"
        del cfg.instance_group[:]
        cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
        cfg.parameters["allow_spinning"].string_value = "1" if spin else "0"
        folder = layout.version_dir(cfg.name, root)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / layout.ONNX_FILE).symlink_to(layout.onnx_path(name).resolve())
        copy_file(BACKEND_MODEL_PY, folder / layout.BACKEND_FILE)
        layout.config_path(cfg.name, root).write_text(config_text(cfg))
        out[setting] = cfg.name
    return out


def choose(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The verdict over every model's timings (module docstring)."""
    verdicts = {}
    for setting in SETTINGS:
        if setting == DEFAULT_SETTING:
            continue
        faster = sum(r["1"][DEFAULT_SETTING]["p50"] / r["1"][setting]["p50"] > MARGIN for r in results.values())
        worst_tput = min(r["16"][setting]["rps"] / r["16"][DEFAULT_SETTING]["rps"] for r in results.values())
        verdicts[setting] = {"p50_faster_on": faster, "worst_c16_throughput_ratio": worst_tput,
                             "eligible": faster > len(results) / 2 and worst_tput >= 1 / MARGIN}
    eligible = [s for s, v in verdicts.items() if v["eligible"]]
    chosen = max(eligible, key=lambda s: verdicts[s]["p50_faster_on"]) if eligible else DEFAULT_SETTING
    return {**_setting(chosen), "verdicts": verdicts, "models": {m: per_model(r) for m, r in results.items()}}


def _setting(name: str) -> dict[str, Any]:
    spin, instances = SETTINGS[name]
    return {"chosen": name, "spinning": spin, "instances": instances}


def per_model(r: dict[str, Any]) -> dict[str, Any]:
    """One model's own verdict: the setting with the best c=1 p50 among those more than ``MARGIN`` faster there
    than the default that keep at least 1/``MARGIN`` of its c=16 throughput; else the default."""
    base1, base16 = r["1"][DEFAULT_SETTING], r["16"][DEFAULT_SETTING]
    ok = [s for s in SETTINGS if s != DEFAULT_SETTING and base1["p50"] / r["1"][s]["p50"] > MARGIN
          and r["16"][s]["rps"] / base16["rps"] >= 1 / MARGIN]
    return _setting(min(ok, key=lambda s: r["1"][s]["p50"]) if ok else DEFAULT_SETTING)


def render(results: dict[str, dict[str, Any]], verdict: dict[str, Any], meta: dict[str, Any]) -> str:
    rows = []
    for name, r in results.items():
        for setting in SETTINGS:
            c1, c16 = r["1"][setting], r["16"][setting]
            d1, d16 = r["1"][DEFAULT_SETTING], r["16"][DEFAULT_SETTING]
            chosen = verdict["models"][name]["chosen"]
            rows.append([name, ("**" + setting + "**") if setting == chosen else setting,
                         f"{c1['p50']:.2f} / {c1['p95']:.2f} / {c1['p99']:.2f}", f"{d1['p50'] / c1['p50']:.2f}x",
                         f"{c16['rps']:.0f}", f"{c16['rps'] / d16['rps']:.2f}x",
                         f"{c16['p50']:.2f} / {c16['p99']:.2f}"])
    vrows = [[s, v["p50_faster_on"], f"{v['worst_c16_throughput_ratio']:.2f}", "yes" if v["eligible"] else "no"]
             for s, v in verdict["verdicts"].items()]
    return with_host_line("\n".join([
        "# Spin-wait and instances, chosen by served measurement",
        "",
        f"tritonserver (python backend, onnxruntime), gRPC, batch-1 requests, the dynamic batcher on; the four "
        f"settings of a model served side by side and alternated {meta['rounds']} times over {meta['duration']} s "
        f"per concurrency; load average before the run {meta['loadavg']}. Speed-ups are against the project's "
        f"default ({DEFAULT_SETTING}); above 1 is better.",
        "",
        md_table(["model", "setting", "c=1 p50 / p95 / p99 ms", "c=1 p50 speed-up", "c=16 req/s",
                  "c=16 throughput ratio", "c=16 p50 / p99 ms"], rows),
        "",
        f"Per model (bold above), a setting replaces the default when its c=1 p50 is more than {MARGIN:.2f}x faster "
        f"and it keeps at least 1/{MARGIN:.2f} of the c=16 throughput; the fastest such setting at c=1 is served. "
        f"Models not measured here get the host-wide verdict below.",
        "",
        f"## Host-wide verdict: **{verdict['chosen']}**",
        "",
        f"A setting replaces the default for every other model only if its c=1 p50 is more than {MARGIN:.2f}x faster "
        f"on most models and no model loses more than {MARGIN:.2f}x of its c=16 throughput.",
        "",
        md_table(["setting", "models with c=1 p50 faster", "worst c=16 throughput ratio", "eligible"], vrows),
        "",
    ]))


def run(models: list[str], duration: float, rounds: int, out_dir: Path) -> dict[str, Any]:
    import os

    from tqdm import tqdm

    from serving.server import TritonServer, free_ports

    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = {}
    for m in tqdm(models, desc="served threading"):
        root = Path(tempfile.mkdtemp(prefix="attnzoo-threads-"))
        try:  # one server per model: a model's four settings side by side, no other model's stubs resident
            variants = write_variants(m, root)
            http, grpc, metrics = free_ports(3)
            with TritonServer(root, list(variants.values()), http_port=http, grpc_port=grpc, metrics_port=metrics,
                              require_all=True) as server:
                print(f"{m}:", file=sys.stderr)
                results[m] = bench_model(server, m, variants, duration, rounds)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    verdict = choose(results)
    meta = {"duration": duration, "rounds": rounds, "loadavg": loadavg, "concurrency": list(CONCURRENCY)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "served_threads.json").write_text(json.dumps({"meta": meta, "results": results, "verdict": verdict},
                                                            indent=1) + "\n")
    (out_dir / "served_threads.md").write_text(render(results, verdict, meta))
    return verdict


def main(argv: list[str] | None = None) -> int:
    from export.host_choice import record_served_threading
    from training import paths
    from training.cli import model_names

    p = bench_parser("python -m bench.served_threads", __doc__, "seconds per concurrency and setting", 4,
                     "alternations of the settings")
    p.set_defaults(models=list(DEFAULT_MODELS), duration=24.0)
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    names = model_names(a.models)
    if names is None:
        return 2
    from serving.repository import spec_for

    names = [n for n in names if spec_for(n).composition is None]
    try:
        verdict = run(names, a.duration, a.rounds, paths.REPORTS_DIR)
        path = record_served_threading(verdict)
    except Exception as e:
        return cli_error(e, a.debug)
    print(f"verdict: {verdict['chosen']} (recorded in {path}); wrote {paths.REPORTS_DIR / 'served_threads.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
