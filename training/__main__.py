"""python -m training <model|all> [--force] [--steps N]: train what is missing and print the bars."""

from __future__ import annotations

import argparse
import sys

from training.registry import UnknownModelError, get_spec, list_models
from training.train import ensure_trained, train_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("models", nargs="+", help="model names, or 'all'")
    p.add_argument("--force", action="store_true", help="retrain even if a checkpoint exists")
    p.add_argument("--steps", type=int, help="override the recipe's step count")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(argv)
    try:
        names = list_models() if a.models == ["all"] else [get_spec(n).name for n in a.models]
        failed = False
        for name in names:
            m = train_model(name, steps=a.steps) if a.force or a.steps else ensure_trained(name)
            extra = {k: v for k, v in m.items() if k not in ("bar_failures",)}
            print(f"{name}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in extra.items()))
            for f in m.get("bar_failures", []):
                failed = True
                print(f"  BAR MISSED ({name}): {f}", file=sys.stderr)
        return 1 if failed else 0
    except UnknownModelError as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
