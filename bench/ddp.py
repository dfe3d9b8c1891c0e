"""One process x 2 threads vs 2 processes x 1 thread on this host, at equal steps and global batch
(``python -m bench.ddp``): reports/ddp.{md,json}.

Arms, interleaved per repeat so that a shared host's load falls on all of them alike:

- ``python -m training MODEL --force`` (the one-process loop every shipped weight comes from), 2 intra-op threads;
- ``torchrun --nproc-per-node 1`` (the distributed loop at world 1: its sampler order), 2 threads;
- ``torchrun --nproc-per-node 2`` (DDP over gloo), 1 thread per rank.

Every arm trains the same steps on the same global batch, so they reach the same accuracy (within the tolerance
tests/test_ddp.py states); time to that accuracy is then the training time.
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
import time
from pathlib import Path

from tqdm import tqdm

from export.markdown import host_line
from training import paths

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ARMS = {
    "1 process x 2 threads (one-process loop)": ([], 2),
    "1 process x 2 threads (torchrun, world 1)": ([*TORCHRUN, "--nproc-per-node", "1"], 2),
    "2 processes x 1 thread (torchrun, DDP gloo)": ([*TORCHRUN, "--nproc-per-node", "2"], 1),
}


def run_arm(arm: str, model: str, steps: int, train_size: int, test_size: int, tmp: Path) -> dict:
    launcher, threads = ARMS[arm]
    out = Path(tempfile.mkdtemp(dir=tmp))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo",
           "ATTNZOO_WEIGHTS": str(out / "weights"), "ATTNZOO_ARTIFACTS": str(out / "artifacts")}
    args = ["-m", "training", model, "--force", "--steps", str(steps), "--train-size", str(train_size),
            "--test-size", str(test_size), "--checkpoint-every", "0"]
    cmd = [*launcher, *args] if launcher else [sys.executable, *args]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=paths.REPO_ROOT)
    wall = time.perf_counter() - t0
    rec_path = out / "weights" / f"{model}.json"
    if not rec_path.exists():  # rc 1 only for bars missed at a short budget; no record is a failure
        raise RuntimeError(f"{' '.join(cmd)}: rc {p.returncode}\n{p.stderr[-3000:]}")
    rec = json.loads(rec_path.read_text())
    return {"arm": arm, "wall_seconds": round(wall, 1), "train_seconds": rec["train_seconds"],
            "accuracy": rec["metrics"]["accuracy"], "load_1min_before": round(load, 2),
            "world_size": rec.get("distributed", {}).get("world_size", 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ddp", description=__doc__)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(paths.REPORTS_DIR / "ddp"))
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="attnzoo-ddp-report-"))
    jobs = [arm for _ in range(a.repeats) for arm in ARMS]
    runs = [run_arm(arm, a.model, a.steps, a.train_size, a.test_size, tmp) for arm in tqdm(jobs, desc="ddp report")]
    write(a, runs, Path(a.out))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def write(a: argparse.Namespace, runs: list[dict], out: Path) -> None:
    rows, summary = [], {}
    base = statistics.median(r["train_seconds"] for r in runs if r["arm"] == next(iter(ARMS)))
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        train = statistics.median(r["train_seconds"] for r in rs)
        summary[arm] = {"train_seconds": train, "wall_seconds": statistics.median(r["wall_seconds"] for r in rs),
                        "accuracy": statistics.median(r["accuracy"] for r in rs), "speed_vs_first": base / train}
        s = summary[arm]
        rows.append(f"| {arm} | {len(rs)} | {s['accuracy']:.4f} | {train:.1f} | {train / a.steps * 1000:.0f} | "
                    f"{s['wall_seconds']:.1f} | {s['speed_vs_first']:.2f}x |")
    md = [f"# Data-parallel training on this host: 1 process x 2 threads vs 2 processes x 1 thread ({a.model})", "",
          host_line(), "",
          f"`python -m bench.ddp --steps {a.steps} --train-size {a.train_size} --test-size {a.test_size} "
          f"--repeats {a.repeats}`: the recipe's global batch, {a.steps} steps, {a.train_size} training / "
          f"{a.test_size} test samples; medians over {a.repeats} repeat(s), arms interleaved. Train s is the "
          "training loop alone (the record's `train_seconds`), wall s the whole command (start-up, data, "
          "evaluation, saving).", "",
          "| arm | runs | test accuracy | train s | ms / step | wall s | train speed vs the first |",
          "|---|---|---|---|---|---|---|", *rows, "",
          "Every run (1-minute load average of the host before it: other agents share these 2 cores):", "",
          "| arm | train s | wall s | accuracy | load before |", "|---|---|---|---|---|",
          *[f"| {r['arm']} | {r['train_seconds']} | {r['wall_seconds']} | {r['accuracy']:.4f} | "
            f"{r['load_1min_before']} |" for r in runs], ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps({"model": a.model, "steps": a.steps, "train_size": a.train_size,
                                                    "test_size": a.test_size, "runs": runs, "summary": summary},
                                                   indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
