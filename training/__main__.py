"""python -m training <model|all> [--force] [--steps N]: train what is missing or stale and print the bars.

python -m training FAMILY --data DIR --name NAME [--layout folder|cub] [--size PX] [--steps N]: train a model
of FAMILY (a registered model or a one-model family) on your own image tree; it is then exported, served and
called by NAME like any registered model (training.derived). --init CHECKPOINT starts it from a zoo model's
weights or a state-dict file of the same family (training.finetune).

Under torchrun (torchrun --nproc-per-node N -m training ...) the same commands train data-parallel
(training.distributed): the recipe's global batch split over the ranks, rank 0 writing the weights."""

from __future__ import annotations

import argparse
import json
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
    from training.derived import DerivationError
    from training.userdata import DataError, report_skipped
    from training.usertrain import create_user_model

    if len(a.models) != 1:
        print("error: --data trains one model: give one FAMILY (e.g. cnn, racnn)", file=sys.stderr)
        return 2
    if not a.name:
        print("error: --data needs --name NAME for the new model", file=sys.stderr)
        return 2
    from training.finetune import FinetuneError

    try:
        kw, main_rank = _trainer_kwargs(a)
        if a.init:
            from training.finetune import initializer
            from training.userdata import scan

            init, report = initializer(a.init, len(scan(a.data, a.layout).classes))  # the new head's classes
            kw.update(initializer=init, extra={"init": report.source})
        rec = create_user_model(a.models[0], a.data, a.name, a.layout, a.size, a.steps, a.skip_bad_images, a.seed,
                                write=main_rank, **kw)
        if a.init:
            rec["init"] = report.as_dict()
            if main_rank:
                from training.checkpoints import load_record, record_path

                record_path(a.name).write_text(json.dumps({**load_record(a.name), "init": rec["init"]}, indent=2)
                                               + "\n")
    except (DataError, DerivationError, FinetuneError) as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not main_rank:
        return 0
    report_skipped(rec["skipped"])
    _print_record(a.name, rec)
    print(f"spec: {rec['spec_file']}; next: python -m export {a.name} && python -m serving.repository")
    return 0


def _trainer_kwargs(a: argparse.Namespace) -> tuple[dict, bool]:
    """The training loop to call and its options: the distributed one under torchrun (after rank 0 alone
    decoded a user tree into the shared cache), else the one-process loop. Returns (kwargs, is rank 0)."""
    kw: dict = {}
    if a.train_size:
        kw["train_size"] = a.train_size
    if a.test_size:
        kw["test_size"] = a.test_size
    from training import distributed

    if not distributed.launched():
        return kw, True
    ctx = distributed.join()
    if a.data:
        from torch import distributed as dist

        from training.usertrain import prepare_user_model

        if ctx.is_main:  # decode once into the cache and write the spec; the other ranks then read both
            prepare_user_model(a.models[0], a.data, a.name, a.layout, a.size, a.steps, a.skip_bad_images, a.seed)
        dist.barrier()
    kw.update(trainer=distributed.train_model, checkpoint_every=a.checkpoint_every)
    return kw, ctx.is_main


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
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="with --data: fine-tune from a zoo model's weights (its name) or a state-dict file of the "
                        "same family (first conv adapted to the channels, a new head for the tree's classes)")
    p.add_argument("--train-size", type=int, help="override the recipe's training-split size (quick trials)")
    p.add_argument("--test-size", type=int, help="override the recipe's test-split size (quick trials)")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS",
                   help="under torchrun: save the resumable run state every STEPS steps (default 100; 0: never)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(argv)
    if a.init and not a.data:
        print("error: --init fine-tunes a model for your images: it needs --data DIR (and --name NAME)",
              file=sys.stderr)
        return 2
    clean = False
    try:
        rc = _train_user_model(a) if a.data else _train_zoo(a)
        clean = True
        return rc
    finally:
        from training import distributed

        distributed.shutdown(clean)


def _train_zoo(a: argparse.Namespace) -> int:
    from training.train import ensure_trained, is_current, train_model

    names = model_names(a.models)
    if names is None:
        return 2
    kw, main_rank = _trainer_kwargs(a)
    trainer = kw.pop("trainer", train_model)
    failed = False
    for name in names:
        # A distributed job trains what is stale (ensure_trained would train it in one process).
        if a.force or a.steps or a.train_size or a.test_size or (trainer is not train_model and not is_current(name)):
            rec = trainer(name, steps=a.steps, **kw)
        else:
            rec = ensure_trained(name)
        if main_rank:
            failed |= _print_record(name, rec)
    if failed and trainer is not train_model:
        # torchrun restarts a job whose worker exits non-zero (--max-restarts): a missed bar is no failure to retry.
        print("bars missed (listed above and in the records); exit 0 under torchrun, which would rerun the job",
              file=sys.stderr)
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
