"""The export manifest (export/manifest.py) and what reads it: the repository generator serves a variant only where
the manifest says its gate passed on these very files, applies the host choice (engine, spin-wait, instances;
export/host_choice.py), stamps the repository with its target, and the server refuses another target's."""

from __future__ import annotations

import json
import shutil

import pytest

from export import manifest
from export.host_choice import pick_variant
from export.openvino_runner import batch_buckets
from serving import repository as rep
from tests.conftest import require_onnx
from training import layout
from training.registry import get_spec

MODEL = "cnn"


@pytest.fixture()
def repo(tmp_path):
    """A repository with cnn's exported fp32 graph (a copy) and a manifest recording its parity verdict."""
    src = require_onnx(MODEL)
    dst = layout.onnx_path(MODEL, tmp_path)
    dst.parent.mkdir(parents=True)
    shutil.copyfile(src, dst)
    manifest.write(get_spec(MODEL), {MODEL: dst}, {"passed": True, "max_abs": 1e-6}, repo_dir=tmp_path)
    return tmp_path


def _candidate(engine, variant, setting, p1, p32, passed=True):
    return {"engine": engine, "variant": variant, "setting": setting, "passed": passed, "p50": {"1": p1, "32": p32}}


def test_export_wrote_a_manifest_that_names_the_served_graphs_and_their_gates():
    require_onnx(MODEL)
    data = manifest.load(MODEL)
    assert data is not None, "make export writes model_repository/cnn/export.json"
    assert data["schema"] == manifest.SCHEMA and data["model"] == MODEL
    fp32 = manifest.servable(data, "fp32")  # raises if the file is not the one that passed parity
    assert fp32 == {MODEL: layout.onnx_path(MODEL)}
    assert data["variants"]["fp32"]["gate"]["max_abs"] <= get_spec(MODEL).checks.fp32_max_abs
    for variant in ("fp16", "int8"):  # recorded only with a passed gate
        v = data["variants"].get(variant)
        assert v is None or v["gate"]["passed"], v


def test_a_graph_changed_after_its_gate_is_refused_naming_the_file(repo):
    rep.write_repository([MODEL], "cpu", repo)
    onnx_file = layout.onnx_path(MODEL, repo)
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(manifest.ManifestError, match=rf"{onnx_file}.*sha256 differs.*python -m export {MODEL}"):
        rep.write_repository([MODEL], "cpu", repo)


def test_another_schema_is_a_clear_error(repo):
    path = manifest.manifest_path(MODEL, repo)
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema": 99}))
    with pytest.raises(manifest.ManifestError, match="schema 99"):
        rep.write_repository([MODEL], "cpu", repo)


def test_int8_is_served_only_where_the_manifest_and_this_hosts_choice_say_so(repo, capsys):
    int8 = layout.int8_onnx_path(MODEL, repo_dir=repo)
    int8.parent.mkdir(parents=True)
    shutil.copyfile(layout.onnx_path(MODEL, repo), int8)  # stands in for the int8 graph: only files are read
    manifest.set_variant(MODEL, "int8", {MODEL: int8}, {"passed": True}, repo_dir=repo)
    spec = get_spec(MODEL)
    for shapes, served_int8 in (("dynamic", {"engine": "onnxruntime", "setting": "spin on", "instances": None}),
                                ("static", None)):
        fp32 = {"engine": "openvino", "setting": shapes, "instances": 2}
        choice = {"isa_key": "test-isa", "served": {"fp32": fp32, "int8": served_int8}}
        rep.write_model(spec, "cpu", repo, choice=choice)
        cfg = rep.parse_config(layout.config_path(MODEL, repo).read_text())
        assert cfg.parameters["engine"].string_value == "openvino"
        assert cfg.parameters["allow_spinning"].string_value == "0"
        assert cfg.parameters["shapes"].string_value == shapes  # OpenVINO per batch bucket, or compiled dynamic
        # static: Triton warms every bucket at load (zeros, the inputs' opt sizes), so no such request compiles
        warm = [(w.batch_size, list(w.inputs["image"].dims)) for w in cfg.model_warmup]
        assert [b for b, _ in warm] == (list(batch_buckets(cfg.max_batch_size)) if shapes == "static" else [1, 32])
        assert all(dims == [1, 64, 64] for _, dims in warm)
        assert cfg.instance_group[0].count == 2
        int8_cfg = layout.config_path(MODEL + layout.INT8_SUFFIX, repo)
        if served_int8:
            c = rep.parse_config(int8_cfg.read_text())
            assert (c.parameters["engine"].string_value, c.parameters["allow_spinning"].string_value) == \
                ("onnxruntime", "1")
        else:  # slower than fp32 here: its config goes, its graph stays for a host where it is faster
            assert not int8_cfg.exists() and int8.exists()
            assert "not served" in capsys.readouterr().err
    assert manifest.load(MODEL, repo)["host_choice"]["test-isa"]["int8"] is None  # recorded per instruction set


def test_a_choice_routed_by_batch_size_is_written_as_routes_and_read_back(repo):
    """Engines that trade places with the batch size: the config carries the routes (not one engine), Triton warms
    every bucket (one route runs OpenVINO's static shapes), and the backend reads back exactly those routes."""
    from export.cpu_engines import Route

    routes = [{"up_to": 4, "engine": "openvino", "setting": "static"},
              {"up_to": None, "engine": "onnxruntime", "setting": "spin on"}]
    fp32 = {"engine": "onnxruntime", "setting": "spin on", "routes": routes, "instances": 1}
    rep.write_model(get_spec(MODEL), "cpu", repo, choice={"isa_key": "test-isa", "served": {"fp32": fp32}})
    cfg = rep.parse_config(layout.config_path(MODEL, repo).read_text())
    assert not {"engine", "allow_spinning", "shapes"} & set(cfg.parameters)
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert Route.from_parameters(params) == (Route(4, "openvino", "static"), Route(None, "onnxruntime", "spin on"))
    assert [w.batch_size for w in cfg.model_warmup] == list(batch_buckets(cfg.max_batch_size))
    # one engine: the single route the older parameters name
    assert Route.from_parameters({"engine": "openvino"}) == (Route(None, "openvino", "dynamic"),)
    assert Route.from_parameters({"allow_spinning": "1"}) == (Route(None, "onnxruntime", "spin on"),)
    for bad, why in (('[{"up_to": 4, "engine": "openvino", "setting": "static"}]', "last be null"),
                     ('[{"up_to": 8, "engine": "openvino", "setting": "static"}, {"up_to": 4, "engine": '
                      '"onnxruntime", "setting": "spin off"}, {"up_to": null, "engine": "onnxruntime", '
                      '"setting": "spin off"}]', "must ascend"),
                     ('[{"up_to": null, "engine": "tvm", "setting": "x"}]', "unknown engine")):
        with pytest.raises(ValueError, match=why):
            Route.parse(bad)


def test_a_variant_slower_than_the_served_fp32_at_any_batch_is_never_served():
    cands = [_candidate("onnxruntime", "fp32", "spin off", 1.0, 10.0),
             _candidate("onnxruntime", "fp32", "spin on", 0.5, 9.0),
             _candidate("openvino", "fp32", "dynamic", 0.98, 9.9),  # within the 5% margin: the default stays
             _candidate("onnxruntime", "int8", "spin off", 0.95, 6.0),  # faster than fp32 spin off at both
             _candidate("openvino", "int8", "dynamic", 1.1, 3.0)]  # slower at batch 1
    # spin off (no served measurement): fp32 stays the project's default, int8 beats it at both batches
    assert pick_variant(cands, "fp32")["setting"] == "spin off"
    chosen = pick_variant(cands, "int8")
    assert (chosen["engine"], chosen["setting"]) == ("onnxruntime", "spin off")
    assert chosen["speedup_vs_fp32"]["32"] == pytest.approx(10.0 / 6.0)
    # spin on chosen by served measurement: fp32 spin on is faster than every int8 at batch 1: no int8
    assert pick_variant(cands, "fp32", spin="spin on")["setting"] == "spin on"
    assert pick_variant(cands, "int8", spin="spin on") is None
    cands[3]["passed"] = False  # a failed gate is never served, however fast
    assert pick_variant(cands, "int8") is None


def test_the_server_refuses_a_repository_generated_for_another_target(repo):
    from serving.server import ServerError, TritonServer

    rep.write_repository([MODEL], "gpu", repo)
    assert rep.read_stamp(repo)["target"] == "gpu"
    with pytest.raises(ServerError, match=r"generated for --target gpu.*attnzoo repository --target cpu"):
        TritonServer(repo).start()
    rep.write_repository([MODEL], "cpu", repo)
    assert rep.read_stamp(repo) | {} and rep.read_stamp(repo)["target"] == "cpu"
