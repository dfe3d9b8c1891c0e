"""The sweep command: one builder argument over the shipped weights, measured side by side."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from bench import sweep
from export.markdown import HOST_LINE_PREFIX
from tests.conftest import early, early_process, require_checkpoint


def test_variant_keeps_the_weights_and_changes_the_argument():
    from training import get_spec

    spec = get_spec("feedback")
    v = sweep.variant(spec, "iters", 3)
    assert v.name == "feedback_iters3" and v.builder().iters == 3 and spec.builder().iters != 3
    assert set(v.builder().state_dict()) == set(spec.builder().state_dict())


SWEEP = ["-m", "bench.sweep", "feedback", "--param", "iters", "--values", "0", "2", "--batches", "1",
         "--rounds", "2", "--test-size", "32"]


def _run_sweep() -> tuple[subprocess.CompletedProcess, Path]:
    out = Path(tempfile.mkdtemp(prefix="attnzoo-sweep-"))
    env = {**os.environ, "ATTNZOO_REPORTS": str(out / "reports"), "ATTNZOO_ARTIFACTS": str(out / "artifacts")}
    return early_process(SWEEP, env), out / "reports"


def start_early() -> None:
    """The sweep (two exports, timings, an evaluation) runs in the background from the session's start."""
    early("sweep-feedback-iters", _run_sweep)


@pytest.mark.slow
def test_sweep_feedback_iterations_writes_its_report():
    require_checkpoint("feedback")
    proc, reports = early("sweep-feedback-iters", _run_sweep).result()
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads((reports / "sweep_feedback_iters.json").read_text())
    assert [r["iters"] for r in rows] == [0, 2]
    assert rows[1]["nodes"] > rows[0]["nodes"]  # the unrolled iterations are in the graph
    assert all(r["parity_max_abs"] < 0.5 for r in rows)
    # Zero iterations: the second look is the first, the saliency the gradient's.
    assert rows[0]["metrics"]["pointing_feedback"] == rows[0]["metrics"]["pointing_gradient"]
    md = (reports / "sweep_feedback_iters.md").read_text()
    assert md.startswith("# feedback: iters swept") and HOST_LINE_PREFIX in md
    assert (reports / "sweep_feedback_iters.png").stat().st_size > 0


def test_sweep_cli_names_an_unknown_argument(capsys):
    assert sweep.main(["cnn", "--param", "iters", "--values", "1"]) == 2
    assert "iters" in capsys.readouterr().err
