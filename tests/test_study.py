"""Seeded studies: resumable runs keyed by fingerprint, shipped checkpoints reused, claims judged by the spread."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench.study import Arm, Claim, Study, get_study, list_studies, run_study, seeded, summarize
from training import paths
from training.registry import Stage, TrainRecipe, get_spec
from training.train import plan_stages


@pytest.fixture
def reports(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "REPORTS_DIR", tmp_path)
    return tmp_path


def _study(claims=()) -> Study:
    cnn = get_spec("cnn")
    other = dataclasses.replace(cnn, name="cnn_variant")
    return Study("toy", "toy study", (Arm("base", cnn, "the shipped cnn"), Arm("variant", other, "a copy")),
                 claims=claims, seeds=(0, 1))


class FakeTrainer:
    """Stands in for train_model: accuracy from a table by (model, seed); counts calls."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, spec, save, progress):
        assert save is False  # a study never writes beside the shipped weights
        self.calls.append(spec.name)
        return {"metrics": {"accuracy": self.table[(spec.name.split("@")[0], spec.train.seed)]},
                "train_seconds": 1.0, "params": 1, "host": {}, "steps": 1}


def test_seeded_keeps_the_spec_at_its_own_seed_and_renames_others():
    spec = get_spec("cnn")
    assert seeded(spec, spec.train.seed) is spec
    s1 = seeded(spec, 1)
    assert s1.name == "cnn@seed1" and s1.train.seed == 1 and s1.train.steps == spec.train.steps


def test_study_reuses_the_shipped_checkpoint_resumes_and_reports(reports):
    from training.checkpoints import load_record

    fake = FakeTrainer({("cnn", 1): 0.95, ("cnn_variant", 0): 0.90, ("cnn_variant", 1): 0.91})
    study = _study((Claim("base beats variant", ("base",), ("variant",)),
                    Claim("variant is like base", ("variant",), ("base",), "similar")))
    results = run_study(study, progress=False, train=fake)
    # cnn at seed 0 is the shipped checkpoint: its fingerprint matches, so it is not trained again.
    assert sorted(fake.calls) == ["cnn@seed1", "cnn_variant", "cnn_variant@seed1"]
    base = results["arms"][0]
    assert base["per_seed"][0] == load_record("cnn")["metrics"]["accuracy"]
    greater, similar = results["claims"]
    assert greater["paired_differences"] == pytest.approx([base["per_seed"][0] - 0.90, 0.95 - 0.91])
    assert greater["verdict"].startswith("holds") == (min(greater["paired_differences"]) > 0
                                                     and greater["difference"] > greater["seed_spread"])
    assert similar["verdict"].startswith("does not hold") == (abs(similar["difference"]) > similar["seed_spread"])
    for suffix in ("json", "md", "png"):
        assert (reports / f"study_toy.{suffix}").stat().st_size > 0
    assert "| base |" in (reports / "study_toy.md").read_text()
    # Resumed: everything is measured, nothing trains.
    again = FakeTrainer({})
    run_study(study, progress=False, train=again)
    assert again.calls == []
    assert len(json.loads((reports / "study_toy.json").read_text())["runs"]) == 4


def test_claim_verdicts_against_the_spread():
    study = _study((Claim("c", ("base",), ("variant",)),))
    runs = {}
    from training.fingerprint import weights_fingerprint

    def put(arm, seed, acc):
        spec = seeded(next(a.spec for a in study.arms if a.label == arm), seed)
        runs[weights_fingerprint(spec)] = {"metrics": {"accuracy": acc}, "params": 1, "train_seconds": 1.0}

    for base, var, want in (((0.97, 0.96), (0.90, 0.91), "holds, beyond the seed spread"),
                            ((0.97, 0.90), (0.95, 0.89), "same sign, but within the seed spread (not shown)"),
                            ((0.90, 0.91), (0.95, 0.96), "does not hold here")):
        for s, (b, v) in enumerate(zip(base, var, strict=True)):
            put("base", s, b)
            put("variant", s, v)
        assert summarize(study, runs, (0, 1))["claims"][0]["verdict"] == want


def test_study_rejects_claims_on_unknown_arms():
    with pytest.raises(ValueError, match="unknown arms"):
        _study((Claim("x", ("nope",), ("base",)),))


def test_registered_studies_build():
    assert {"attention", "residual_attention", "macnn"} <= set(list_studies())
    for name in list_studies():
        study = get_study(name)
        assert len(study.arms) >= 2 and len(study.seeds) >= 2
        recipes = {(a.spec.train.steps, a.spec.train.batch_size, a.spec.train.lr, a.spec.train.train_size)
                   for a in study.arms if not a.spec.train.stages}
        assert len(recipes) <= 1, f"study {name}: its arms differ in recipe {recipes}"
    with pytest.raises(KeyError, match="known studies"):
        get_study("nope")


def test_stage_override_scales_every_stage():
    r = TrainRecipe(stages=(Stage("a", 300), Stage("b", 100)))
    assert r.total_steps == 400
    assert [st.steps for st in plan_stages(r, 40)] == [30, 10]
    assert [st.steps for st in plan_stages(r, None)] == [300, 100]
    assert [st.steps for st in plan_stages(TrainRecipe(steps=50), None)] == [50]
