"""``attnzoo``, the one console script: every subcommand answers --help, an unknown model is one line and exit
status 2 on every command that takes models, and model names are spelled one way whatever the module wants."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from serving.cli import COMMANDS, UNKNOWN_MODEL_EXIT, _translate

ROOT = Path(__file__).resolve().parent.parent
ATTNZOO = Path(sys.executable).parent / "attnzoo"  # installed by `pip install -e .` ([project.scripts])


def attnzoo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    assert ATTNZOO.is_file(), f"{ATTNZOO} is missing: run `make install` (pyproject's [project.scripts])"
    return subprocess.run([str(ATTNZOO), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command():
    out = attnzoo("--help")
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert re.search(rf"^  {re.escape(name)} ", out.stdout, re.M), f"{name} missing from attnzoo --help"


def test_no_command_and_an_unknown_command_are_usage_errors():
    assert attnzoo().returncode == 2
    out = attnzoo("no-such-command")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: unknown command 'no-such-command'; commands: {', '.join(COMMANDS)}"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help(name):
    out = attnzoo(name, "--help")
    assert out.returncode == 0, out.stderr
    assert f"python -m {COMMANDS[name].module}" in out.stdout  # the alias' own options follow


# `python -m serving.repository` and `serving.gallery` exit 1 on an unknown model; through attnzoo every one is 2.
@pytest.mark.parametrize("args", [["train", "no_such_model"], ["export", "cnn", "no_such_model"],
                                  ["repository", "no_such_model"], ["gallery", "no_such_model"],
                                  ["bench", "no_such_model"], ["serve", "no_such_model"],
                                  ["verify", "no_such_model"]])
def test_an_unknown_model_is_one_line_and_exit_2(args):
    out = attnzoo(*args)
    assert out.returncode == UNKNOWN_MODEL_EXIT, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'no_such_model'; known models: " in lines[0], out.stderr
    assert "cnn" in lines[0].split("known models: ")[1].split(", ")


def test_a_one_model_command_refuses_all():
    out = attnzoo("verify", "all")
    assert out.returncode == 2 and out.stderr.strip() == "error: attnzoo verify takes one model name, not 'all'"


def test_models_are_spelled_one_way_whatever_the_module_takes():
    assert _translate("bench", COMMANDS["bench"], ["cnn", "racnn", "--duration", "1"]) == [
        "--models", "cnn", "racnn", "--duration", "1"]
    assert _translate("infer", COMMANDS["infer"], ["cnn", "a.png", "--protocol", "http"]) == [
        "a.png", "--model", "cnn", "--protocol", "http"]
    assert _translate("export", COMMANDS["export"], ["all"]) == ["all"]
    assert _translate("repository", COMMANDS["repository"], ["all", "--target", "gpu"]) == ["--target", "gpu"]
    assert _translate("serve", COMMANDS["serve"], ["all"]) == []
    # a repository in object storage is the server's to check
    assert _translate("replicas", COMMANDS["replicas"], ["cnn_image", "--repo", "s3://h:9000/b/p"]) == [
        "--models", "cnn_image", "--repo", "s3://h:9000/b/p"]
    assert _translate("study", COMMANDS["study"], ["attention"]) == ["attention"]  # not a model name
    # with --data the names are families on a user's tree, checked by the training command itself
    assert _translate("train", COMMANDS["train"], ["nonlocal", "--data", "/x"]) == ["nonlocal", "--data", "/x"]


def test_the_makefile_calls_only_real_subcommands():
    used = set(re.findall(r"\$\(ATTNZOO\) ([\w-]+)", (ROOT / "Makefile").read_text()))
    assert used, "the Makefile does not call attnzoo"
    assert used <= set(COMMANDS), f"Makefile calls unknown attnzoo commands: {sorted(used - set(COMMANDS))}"
