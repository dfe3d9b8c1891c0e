"""The sweep command: one builder argument over the shipped weights, measured side by side."""

from __future__ import annotations

import json

import pytest

from export import sweep
from tests.conftest import require_checkpoint
from training import paths


def test_variant_keeps_the_weights_and_changes_the_argument():
    from training import get_spec

    spec = get_spec("feedback")
    v = sweep.variant(spec, "iters", 3)
    assert v.name == "feedback_iters3" and v.builder().iters == 3 and spec.builder().iters != 3
    assert set(v.builder().state_dict()) == set(spec.builder().state_dict())


@pytest.mark.slow
def test_sweep_feedback_iterations_writes_its_report(tmp_path, monkeypatch):
    require_checkpoint("feedback")
    monkeypatch.setattr(paths, "REPORTS_DIR", tmp_path)
    rows = sweep.sweep("feedback", "iters", [0, 2], batches=(1,), rounds=2, test_size=32)
    assert [r["iters"] for r in rows] == [0, 2]
    assert rows[1]["nodes"] > rows[0]["nodes"]  # the unrolled iterations are in the graph
    assert all(r["parity_max_abs"] < 0.5 for r in rows)
    # Zero iterations: the second look is the first, the saliency the gradient's.
    assert rows[0]["metrics"]["pointing_feedback"] == rows[0]["metrics"]["pointing_gradient"]
    md = sweep.write_report("feedback", "iters", rows, (1,))
    assert md.exists() and (tmp_path / "sweep_feedback_iters.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "sweep_feedback_iters.json").read_text())) == 2


def test_sweep_cli_names_an_unknown_argument(capsys):
    assert sweep.main(["cnn", "--param", "iters", "--values", "1"]) == 2
    assert "iters" in capsys.readouterr().err
