"""python -m training <model|all> [--force] [--steps N]: train what is missing or stale and print the bars.

python -m training FAMILY --data DIR --name NAME [--layout folder|cub] [--size PX] [--steps N]: train a model
of FAMILY (a registered model or a one-model family) on your own image tree; it is then exported, served and
called by NAME like any registered model (training.derived)."""

from __future__ import annotations

import argparse
import sys

from training.cli import model_names


def _print_record(name: str, rec: dict) -> bool:
    m = rec.get("metrics", {})
    print(f"{name}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()
                                  if not k.startswith("iou_")))
    for f in rec.get("bar_failures", []):
        print(f"  BAR MISSED ({name}): {f}", file=sys.stderr)
    return bool(rec.get("bar_failures"))


def _train_user_model(a: argparse.Namespace) -> int:
    from training.derived import DerivationError, create_user_model
    from training.userdata import DataError, report_skipped

    if len(a.models) != 1:
        print("error: --data trains one model: give one FAMILY (e.g. cnn, racnn)", file=sys.stderr)
        return 2
    if not a.name:
        print("error: --data needs --name NAME for the new model", file=sys.stderr)
        return 2
    try:
        rec = create_user_model(a.models[0], a.data, a.name, a.layout, a.size, a.steps, a.skip_bad_images, a.seed)
    except (DataError, DerivationError) as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    report_skipped(rec["skipped"])
    _print_record(a.name, rec)
    print(f"spec: {rec['spec_file']}; next: python -m export {a.name} && python -m serving.repository")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model names, or 'all'; with --data: the FAMILY to train")
    p.add_argument("--force", action="store_true", help="retrain even if the shipped checkpoint is current")
    p.add_argument("--steps", type=int, help="override the recipe's step count")
    p.add_argument("--data", help="train on your own image tree at DIR (ImageFolder or CUB-200-2011 layout)")
    p.add_argument("--layout", choices=("folder", "cub"), help="the tree's layout (default: detected)")
    p.add_argument("--name", help="the new model's name (with --data)")
    p.add_argument("--size", type=int, help="input size in px (with --data; default: the family's, 64)")
    p.add_argument("--seed", type=int, default=0, help="training seed (with --data)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable image files out (reported) instead of stopping at the first")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(argv)
    if a.data:
        return _train_user_model(a)
    from training.train import ensure_trained, train_model

    names = model_names(a.models)
    if names is None:
        return 2
    failed = False
    for name in names:
        rec = train_model(name, steps=a.steps) if a.force or a.steps else ensure_trained(name)
        failed |= _print_record(name, rec)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
