"""The serving contract (serving/contract.py): the one writer and the one reader of a config's parameters."""

from __future__ import annotations

import json

import pytest

from serving.contract import Contract, ContractError
from training import layout
from training.images import ImagePreprocess


def _configs() -> list:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    out = []
    for path in sorted(layout.repository_root().glob(f"*/{layout.CONFIG_FILE}")):
        out.append(text_format.Parse(path.read_text(), mc.ModelConfig()))
    return out


def test_every_generated_config_reads_back_as_it_was_written():
    configs = _configs()
    if not configs:
        pytest.skip("no generated repository: run `make export` first")
    for cfg in configs:
        contract = Contract.from_config(cfg)
        written = contract.parameters()
        for key, value in written.items():
            if key not in cfg.parameters:  # absent ones read as empty, and are written as empty
                continue
            was = cfg.parameters[key].string_value
            assert (value == was) if key == "description" else (json.loads(value) == json.loads(was)), (cfg.name, key)


def test_the_json_and_protobuf_forms_read_alike():
    pre = ImagePreprocess(64, 1, 73)
    params = Contract("d", {"logits": "logits"}, {"image": {1: (48, 96)}}, {"target": (0, 9)}, {"target": 0},
                      pre).parameters()
    as_json = {"name": "m", "parameters": {k: {"string_value": v} for k, v in params.items()}}
    c = Contract.from_config(as_json)
    assert c.input_bounds == {"image": {1: (48, 96)}} and c.input_ranges == {"target": (0.0, 9.0)}
    assert c.preprocess == pre and c.output_kinds == {"logits": "logits"} and c.input_defaults == {"target": 0}
    assert Contract.from_parameters({}) == Contract("", {}, {}, {}, {}, None)


@pytest.mark.parametrize("params, match", [
    ({"input_bounds": "{not json"}, "'input_bounds' is not JSON"),
    ({"input_bounds": '{"image": {"x": [1, 2]}}'}, "malformed config parameter"),
    ({"preprocess": '{"size": 64}'}, "malformed config parameter"),
])
def test_a_malformed_parameter_is_one_line_naming_the_model(params, match):
    with pytest.raises(ContractError, match=match) as e:
        Contract.from_parameters(params, "cnn")
    assert "model 'cnn'" in str(e.value) and "\n" not in str(e.value)
