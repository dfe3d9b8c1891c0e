"""Seeded comparisons of model variants (a paper's claim, measured): every arm trained with the same recipe at
several seeds, test metrics tabulated with their spread, each claim checked against that spread.

A run is keyed by its weights fingerprint, so a study resumes where it stopped and reuses any shipped
checkpoint trained from the same code, recipe and seed (the served models' own seed); nothing is saved
beside the shipped weights. Results go to ``reports/study_<name>.{json,md,png}``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from training import paths
from training.checkpoints import load_record
from training.fingerprint import weights_fingerprint
from training.registry import ModelSpec


@dataclass(frozen=True)
class Arm:
    """One variant: a label for the table and the spec it trains (registered or not)."""

    label: str
    spec: ModelSpec
    note: str = ""
    # The test metric this arm reads (None: the study's). Arms of one spec that read different outputs of the
    # same runs (a pipeline's levels) train once per seed: runs are keyed by the weights fingerprint.
    metric: str | None = None


@dataclass(frozen=True)
class Claim:
    """``greater``: the mean of ``better`` exceeds the mean of ``worse``; ``similar``: they differ by no more
    than the seed spread. Checked per seed (paired: the same seed means the same data) and on the means."""

    text: str
    better: tuple[str, ...]
    worse: tuple[str, ...]
    kind: Literal["greater", "similar"] = "greater"


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    arms: tuple[Arm, ...]
    claims: tuple[Claim, ...] = ()
    metric: str = "accuracy"
    seeds: tuple[int, ...] = (0, 1)
    description: str = ""
    also: tuple[str, ...] = ()  # more test metrics shown beside the main one (mean over seeds)

    def __post_init__(self) -> None:
        labels = [a.label for a in self.arms]
        if len(set(labels)) != len(labels):
            raise ValueError(f"study {self.name!r}: arm labels repeat: {labels}")
        unknown = {x for c in self.claims for x in (*c.better, *c.worse)} - set(labels)
        if unknown:
            raise ValueError(f"study {self.name!r}: claims name unknown arms {sorted(unknown)}")


_STUDIES: dict[str, Callable[[], Study]] = {}


def register_study(name: str) -> Callable[[Callable[[], Study]], Callable[[], Study]]:
    """Studies are built lazily: building one builds its arms' specs (and imports their models)."""
    def wrap(fn: Callable[[], Study]) -> Callable[[], Study]:
        _STUDIES[name] = fn
        return fn

    return wrap


# The modules that register studies (plugins, timm's habit for models): loaded by name on first lookup, as
# ``training.models`` loads the families, so that the catalog imports this framework and not the reverse.
STUDY_MODULES = ("bench.studies",)


def _load_catalog() -> None:
    for module in STUDY_MODULES:
        importlib.import_module(module)


def get_study(name: str) -> Study:
    _load_catalog()
    if name not in _STUDIES:
        raise KeyError(f"unknown study {name!r}; known studies: {', '.join(sorted(_STUDIES))}")
    return _STUDIES[name]()


def list_studies() -> list[str]:
    _load_catalog()
    return sorted(_STUDIES)


def seeded(spec: ModelSpec, seed: int) -> ModelSpec:
    """``spec`` trained from another seed (model init, data order and the generated images); the spec's own
    seed keeps its name, so its fingerprint is the shipped checkpoint's."""
    if seed == spec.train.seed:
        return spec
    return dataclasses.replace(spec, name=f"{spec.name}@seed{seed}", train=dataclasses.replace(spec.train, seed=seed))


def results_path(study: Study, suffix: str) -> Path:
    return paths.REPORTS_DIR / f"study_{study.name}.{suffix}"


def _load_runs(study: Study) -> dict[str, dict[str, Any]]:
    p = results_path(study, "json")
    return json.loads(p.read_text()).get("runs", {}) if p.exists() else {}


def _shipped_run(spec: ModelSpec, fingerprint: str) -> dict[str, Any] | None:
    record = load_record(spec.name)
    if record.get("fingerprint") != fingerprint:
        return None
    return {k: record[k] for k in ("metrics", "train_seconds", "params", "host", "steps") if k in record}


def run_study(study: Study, seeds: tuple[int, ...] | None = None, progress: bool = True,
              train: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train every (arm, seed) not yet measured, save after each run, and return the results."""
    if train is None:
        from training.train import train_model as train
    seeds = tuple(seeds or study.seeds)
    runs = _load_runs(study)
    todo = [(arm, s) for arm in study.arms for s in seeds]
    bar = tqdm(todo, desc=f"study {study.name}", disable=not progress, unit="run")
    for arm, seed in bar:
        spec = seeded(arm.spec, seed)
        fp = weights_fingerprint(spec)
        if fp not in runs:
            reused = _shipped_run(spec, fp)
            run = reused if reused is not None else train(spec, save=False, progress=progress)
            runs[fp] = {"arm": arm.label, "model": spec.name, "seed": seed, "reused_checkpoint": reused is not None,
                        **{k: run[k] for k in ("metrics", "train_seconds", "params", "host", "steps") if k in run}}
            _save(study, runs, seeds)
        bar.set_postfix(arm=arm.label, seed=seed, **{study.metric: f"{runs[fp]['metrics'][study.metric]:.4f}"})
    results = summarize(study, runs, seeds)
    _save(study, runs, seeds)
    write_report(study, results)
    return results


def _save(study: Study, runs: dict[str, dict[str, Any]], seeds: tuple[int, ...]) -> None:
    paths.REPORTS_DIR.mkdir(parents=True, exist_ok=True)
    out = results_path(study, "json")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"study": study.name, "metric": study.metric, "seeds": list(seeds), "runs": runs},
                              indent=1, sort_keys=True) + "\n")
    tmp.replace(out)


def _spread(values: list[float]) -> float:
    return max(values) - min(values) if values else float("nan")


def summarize(study: Study, runs: dict[str, dict[str, Any]], seeds: tuple[int, ...]) -> dict[str, Any]:
    """Per arm: the metric per seed, mean, sample std and range; per claim: the difference of means, the
    per-seed (paired) differences and a verdict against the seed spread of the arms involved."""
    fps = {(a.label, s): weights_fingerprint(seeded(a.spec, s)) for a in study.arms for s in seeds}
    metric_of = {a.label: a.metric or study.metric for a in study.arms}
    value = {k: runs[fp]["metrics"][metric_of[k[0]]] for k, fp in fps.items() if fp in runs}
    arms = []
    for a in study.arms:
        vals = [value[(a.label, s)] for s in seeds if (a.label, s) in value]
        run0 = next((runs[fps[(a.label, s)]] for s in seeds if (a.label, s) in value), {})
        runs_of = [runs[fps[(a.label, s)]] for s in seeds if (a.label, s) in value]
        also = {m: statistics.fmean(r["metrics"][m] for r in runs_of) for m in study.also
                if runs_of and all(m in r["metrics"] for r in runs_of)}
        arms.append({"label": a.label, "model": a.spec.name, "note": a.note, "params": run0.get("params"), "also": also,
                     "per_seed": {s: value.get((a.label, s)) for s in seeds},
                     "mean": statistics.fmean(vals) if vals else None,
                     "std": statistics.stdev(vals) if len(vals) > 1 else None,
                     "range": _spread(vals) if vals else None,
                     "train_seconds": statistics.fmean(runs[fps[(a.label, s)]].get("train_seconds", 0.0)
                                                       for s in seeds if (a.label, s) in value) if vals else None})
    by_label = {a["label"]: a for a in arms}
    claims = [_judge(c, by_label, value, seeds) for c in study.claims]
    return {"study": study.name, "title": study.title, "metric": study.metric, "seeds": list(seeds),
            "arms": arms, "claims": claims}


def _judge(claim: Claim, arms: dict[str, dict[str, Any]], value: dict[tuple[str, int], float],
           seeds: tuple[int, ...]) -> dict[str, Any]:
    def mean_of(labels: tuple[str, ...], seed: int) -> float | None:
        vals = [value.get((lb, seed)) for lb in labels]
        return None if None in vals else statistics.fmean(vals)

    paired = [(b - w) for s in seeds if (b := mean_of(claim.better, s)) is not None
              and (w := mean_of(claim.worse, s)) is not None]
    spread = max((arms[lb]["range"] or 0.0) for lb in (*claim.better, *claim.worse))
    out: dict[str, Any] = {"text": claim.text, "kind": claim.kind, "better": list(claim.better),
                           "worse": list(claim.worse), "paired_differences": paired, "seed_spread": spread}
    if not paired:
        return {**out, "difference": None, "verdict": "not measured"}
    diff = statistics.fmean(paired)
    if claim.kind == "similar":
        verdict = "holds (difference within the seed spread)" if abs(diff) <= spread else \
            "does not hold (they differ by more than the seed spread)"
    elif diff > 0 and min(paired) > 0 and diff > spread:
        verdict = "holds, beyond the seed spread"
    elif diff > 0:
        verdict = "same sign, but within the seed spread (not shown)"
    else:
        verdict = "does not hold here"
    return {**out, "difference": diff, "verdict": verdict}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def write_report(study: Study, results: dict[str, Any]) -> None:
    seeds = results["seeds"]
    metric = results["metric"]
    spec0 = study.arms[0].spec.train
    lines = [
        f"# {study.title}",
        "",
        f"Generated by `python -m bench.studies {study.name}` (resumable: runs are keyed by their weights "
        "fingerprint). Every arm is trained with the same recipe "
        f"({spec0.total_steps} steps, batch {spec0.batch_size}, AdamW lr {spec0.lr}, {spec0.train_size} training and "
        f"{spec0.test_size} test images) at seeds {', '.join(map(str, seeds))}; a seed sets the initialisation, "
        "the batch order and the generated images, so runs at the same seed see the same data (paired). "
        f"Metric: test {metric}, in percent; spread = max - min over seeds.",
        "",
    ]
    if study.description:
        lines += [study.description, ""]
    lines += ["| arm | what | params | " + " | ".join(f"seed {s}" for s in seeds) +
              " | mean | std | spread | train s |" + "".join(f" {m} |" for m in study.also),
              "|---|---|---|" + "---|" * (len(seeds) + len(study.also)) + "---|---|---|---|"]
    for a in results["arms"]:
        per = " | ".join(_pct(a["per_seed"].get(s)) for s in seeds)
        lines.append(f"| {a['label']} | {a['note']} | {a['params'] or '–'} | {per} | {_pct(a['mean'])} | "
                     f"{_pct(a['std'])} | {_pct(a['range'])} | "
                     f"{'–' if a['train_seconds'] is None else round(a['train_seconds'])} |"
                     + "".join(f" {a['also'][m]:.4f} |" if m in a["also"] else " – |" for m in study.also))
    if results["claims"]:
        lines += ["", "## Claims", "",
                  "| claim | better | worse | difference of means | per seed | seed spread | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in results["claims"]:
            per = ", ".join(f"{100 * d:+.2f}" for d in c["paired_differences"]) or "–"
            diff = "–" if c["difference"] is None else f"{100 * c['difference']:+.2f}"
            lines.append(f"| {c['text']} | {', '.join(c['better'])} | {', '.join(c['worse'])} | {diff} | {per} | "
                         f"{100 * c['seed_spread']:.2f} | {c['verdict']} |")
    lines += ["", f"![{study.name}](study_{study.name}.png)", ""]
    results_path(study, "md").write_text("\n".join(lines))
    _plot(study, results)


def _plot(study: Study, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in results["arms"] if a["mean"] is not None]
    if not arms:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(arms) + 2), 4))
    xs = range(len(arms))
    ax.bar(xs, [100 * a["mean"] for a in arms], color="#8fb3d9", label="mean over seeds")
    for x, a in zip(xs, arms, strict=True):
        vals = [100 * v for v in a["per_seed"].values() if v is not None]
        ax.plot([x] * len(vals), vals, "o", color="#1f3b5c", ms=4, label="one seed" if x == 0 else None)
    lo = min(100 * v for a in arms for v in a["per_seed"].values() if v is not None)
    hi = max(100 * v for a in arms for v in a["per_seed"].values() if v is not None)
    ax.set_ylim(lo - max(1.0, 0.5 * (hi - lo)), hi + max(0.5, 0.2 * (hi - lo)))
    ax.set_xticks(list(xs), [a["label"] for a in arms], rotation=30, ha="right")
    ax.set_ylabel(f"test {results['metric']} (%)")
    ax.set_title(study.title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(results_path(study, "png"), dpi=110)
    plt.close(fig)
