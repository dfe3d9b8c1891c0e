"""python -m export <model|all>: train what is stale, export, check, gate on parity, fill the repository.

One line per model in a summary table at the end; a non-zero exit names the model and what failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from export.pipeline import ExportSummary, export_model, print_summary
from training import paths
from training.cli import model_names
from training.registry import list_models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("models", nargs="+", help="model names, or 'all'")
    p.add_argument("--custom-ops", action="store_true",
                   help="keep custom ops as custom-domain nodes (needs runtime kernels/plugins)")
    p.add_argument("--no-slim", action="store_true", help="skip onnxslim graph simplification")
    p.add_argument("--no-train", action="store_true", help="fail instead of training missing or stale checkpoints")
    p.add_argument("--skip-tensorrt", action="store_true", help="skip the TensorRT parse check")
    p.add_argument("--skip-fp16", action="store_true", help="skip the FP16 graph and its agreement gate")
    p.add_argument("--skip-int8", action="store_true", help="skip the INT8 graph and its gate")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(argv)
    names = model_names(a.models)
    if names is None:
        return 2
    summaries: list[ExportSummary] = []
    start = time.perf_counter()
    for name in names:
        try:
            summaries.append(export_model(name, custom_ops=a.custom_ops, slim=not a.no_slim, train=not a.no_train,
                                          tensorrt=not a.skip_tensorrt, fp16=not a.skip_fp16,
                                          int8=not a.skip_int8))
        except Exception as e:
            if a.debug:
                raise
            summaries.append(ExportSummary(name=name, error=f"{type(e).__name__}: {e}"))
    print_summary(summaries)
    paths.REPORTS_DIR.mkdir(parents=True, exist_ok=True)
    report = paths.REPORTS_DIR / ("parity_custom_ops.json" if a.custom_ops else "parity.json")
    old = json.loads(report.read_text()) if report.exists() else {}
    registered = set(list_models())  # rows of models no longer registered go
    old = {k: v for k, v in old.items() if k in registered}
    old.update({s.name: s.as_dict() for s in summaries})
    report.write_text(json.dumps(old, indent=2) + "\n")
    print(f"wrote {report} ({time.perf_counter() - start:.0f} s)")
    failed = [s for s in summaries if not s.ok]
    for s in failed:
        print(f"error: {s.name}: {s.failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
