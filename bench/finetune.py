"""From scratch vs fine-tuned from the digits, at equal steps, on generated shape trees of several sizes
(``python -m bench.finetune``): reports/finetune.{md,json,png}.

Each run is the documented command, ``python -m training FAMILY --data TREE --name NAME --steps N --seed S``
with or without ``--init CHECKPOINT``, in its own process and user-model folder; the tree (training.sample_trees,
4 shape classes, a fifth of each class held out) is generated from the same seed as the run, so that each seed is
another tree and another training draw.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from export.markdown import host_line
from training import paths
from training.sample_trees import write_folder_tree


def run_one(tmp: Path, tree: Path, family: str, steps: int, seed: int, init: str | None) -> dict:
    name = f"{'ft' if init else 'scratch'}_{tree.name}"
    env = {**os.environ, "ATTNZOO_USER_MODELS": str(tmp / "models"), "ATTNZOO_ARTIFACTS": str(tmp / "artifacts")}
    cmd = [sys.executable, "-m", "training", family, "--data", str(tree), "--name", name, "--steps", str(steps),
           "--seed", str(seed), *(["--init", init] if init else [])]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=paths.REPO_ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: rc {p.returncode}\n{p.stderr[-3000:]}")
    rec = json.loads((tmp / "models" / f"{name}.json").read_text())
    return {"accuracy": rec["metrics"]["accuracy"], "train_seconds": rec["train_seconds"],
            "test_images": json.loads((tmp / "models" / f"{name}.spec.json").read_text())["test_images"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__)
    ap.add_argument("--family", default="cnn")
    ap.add_argument("--init", default="cnn", help="the checkpoint to fine-tune from (a zoo name or a file)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 60], help="images per class in each tree")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 100], help="step budgets (each arm, each tree)")
    ap.add_argument("--out", default=str(paths.REPORTS_DIR / "finetune"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    # Runs already in the report (same family and checkpoint) are kept, not rerun: a report grows budget by budget.
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    runs = old.get("runs", []) if (old.get("family"), old.get("init")) == (a.family, a.init) else []
    have = {(r["per_class"], r["seed"], r["arm"], r["steps"]) for r in runs}
    tmp = Path(tempfile.mkdtemp(prefix="attnzoo-finetune-"))
    jobs = [(n, seed, init, steps) for steps in a.steps for n in a.sizes for seed in a.seeds for init in (None, a.init)
            if (n, seed, "fine-tuned" if init else "from scratch", steps) not in have]
    for n, seed, init, steps in tqdm(jobs, desc="finetune report"):
        tree = tmp / f"tree{n}_s{seed}"
        if not tree.exists():
            write_folder_tree(tree, per_class=n, seed=seed)
        r = run_one(tmp, tree, a.family, steps, seed, init)
        runs.append({"per_class": n, "seed": seed, "arm": "fine-tuned" if init else "from scratch", "steps": steps,
                     **r})
    write(a, runs, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def summarize(runs: list[dict]) -> list[dict]:
    out = []
    for steps in sorted({r["steps"] for r in runs}):
        for n in sorted({r["per_class"] for r in runs if r["steps"] == steps}):
            arms = {arm: sorted((r for r in runs if (r["per_class"], r["steps"], r["arm"]) == (n, steps, arm)),
                                key=lambda r: r["seed"]) for arm in ("from scratch", "fine-tuned")}
            pairs = [(s, f) for s in arms["from scratch"] for f in arms["fine-tuned"] if s["seed"] == f["seed"]]
            if not pairs:
                continue
            mean = {arm: statistics.mean(r["accuracy"] for r in rs) for arm, rs in arms.items()}
            out.append({"steps": steps, "per_class": n, "mean": mean, "pairs": pairs,
                        "fine_tuned_wins": sum(f["accuracy"] > s["accuracy"] for s, f in pairs),
                        "ties": sum(f["accuracy"] == s["accuracy"] for s, f in pairs), "seeds": len(pairs)})
    return out


def write(a: argparse.Namespace, runs: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    rows = [f"| {s['steps']} | {s['per_class']} | {sc['seed']} | {sc['test_images']} | {sc['accuracy']:.3f} | "
            f"{f['accuracy']:.3f} | {f['accuracy'] - sc['accuracy']:+.3f} |"
            for s in summary for sc, f in s["pairs"]]
    md = [f"# Fine-tuning from the digits vs from scratch ({a.family})", "",
          host_line(), "",
          f"`python -m bench.finetune` (runs already in reports/finetune.json are kept): each run is "
          f"`python -m training {a.family} --data TREE --name NAME --steps N --seed S [--init {a.init}]` on a "
          "generated shape tree (training.sample_trees: 4 classes, RGB/grayscale/RGBA JPEG and PNG, 60-500 px, a "
          "fifth of each class held out) whose generator seed is the run's seed. Test accuracy on the tree's "
          "held-out images; chance is 0.25. Both arms run the same steps, batch and schedule; fine-tuning loads the "
          "shipped digit weights (first conv tiled 1 -> 3 channels, a new 4-class head, loaded layers at 0.1 of "
          "the learning rate).", "",
          "| steps | images / class | mean from scratch | mean fine-tuned | fine-tuned better in |",
          "|---|---|---|---|---|",
          *[f"| {s['steps']} | {s['per_class']} | {s['mean']['from scratch']:.3f} | {s['mean']['fine-tuned']:.3f} | "
            f"{s['fine_tuned_wins']} of {s['seeds']} seeds ({s['ties']} tied) |" for s in summary], "",
          "Every run:", "",
          "| steps | images / class | seed | test images | from scratch | fine-tuned | difference |",
          "|---|---|---|---|---|---|---|", *rows, ""]
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps(
        {"family": a.family, "init": a.init, "runs": runs,
         "summary": [{k: v for k, v in s.items() if k != "pairs"} for s in summary]}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({s["steps"] for s in summary})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False, sharey=True)
    for ax, steps in zip(axes[0], budgets, strict=True):
        sizes = [s["per_class"] for s in summary if s["steps"] == steps]
        for arm, colour in (("from scratch", "tab:grey"), ("fine-tuned", "tab:blue")):
            pts = [(r["per_class"], r["accuracy"]) for r in runs if r["arm"] == arm and r["steps"] == steps]
            ax.scatter(*zip(*pts, strict=True), color=colour, alpha=0.4)
            ax.plot(sizes, [s["mean"][arm] for s in summary if s["steps"] == steps], color=colour,
                    label=f"{arm} (mean over seeds)")
        ax.axhline(0.25, color="k", lw=0.5, ls=":", label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("images per class in the tree")
        ax.set_title(f"{steps} steps")
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{a.family}: fine-tuned from {a.init} vs from scratch")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
