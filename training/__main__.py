"""python -m training <model|all> [--force] [--steps N]: train what is missing or stale and print the bars."""

from __future__ import annotations

import argparse
import sys

from training.cli import model_names
from training.train import ensure_trained, train_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("models", nargs="+", help="model names, or 'all'")
    p.add_argument("--force", action="store_true", help="retrain even if the shipped checkpoint is current")
    p.add_argument("--steps", type=int, help="override the recipe's step count")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(argv)
    names = model_names(a.models)
    if names is None:
        return 2
    failed = False
    for name in names:
        rec = train_model(name, steps=a.steps) if a.force or a.steps else ensure_trained(name)
        m = rec.get("metrics", {})
        print(f"{name}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()
                                      if not k.startswith("iou_")))
        for f in rec.get("bar_failures", []):
            failed = True
            print(f"  BAR MISSED ({name}): {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
