"""The reliability report's command, run small: every bad input is refused as the client's fault, the server
stays healthy, a killed stub and a killed server come back."""

from __future__ import annotations

import pytest

from bench.reliability import is_client_error, run, write_report


@pytest.mark.server
def test_reliability_report_small_run(tmp_path):
    report = run(n_load=200, long_requests=200, untrained=True, log=lambda *_: None, stack=False)  # tests/test_stack.py
    not_refused = [r for r in report["bad_inputs"] if not is_client_error(r["status"])]
    assert not not_refused, not_refused
    assert all(r["healthy_after"] for r in report["bad_inputs"]), report["bad_inputs"]
    assert all(r["message"] for r in report["bad_inputs"])
    for key in ("mixed_load", "long_run"):
        m = report[key]
        assert m["wrong"] == 0 and m["right"] + m["refused_as_expected"] == m["requests"], m
    assert report["stub_kill"]["healed"] == ["cnn"]
    assert report["server_kill"]["killer_request_killed_it"] and report["server_kill"]["healthy_after"]
    text = write_report(report, tmp_path).read_text()
    assert "## Bad inputs" in text and "| front door (HTTP) | claims [64,1,100000,100000], no data | 400 |" in text
