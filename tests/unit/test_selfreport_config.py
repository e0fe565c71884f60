"""Self-report config: validation, one-line errors, overrides, the bundled example."""

from __future__ import annotations

import json

import pytest

from neuronhunter.errors import ConfigError
from neuronhunter.selfreport import NeuronRef, SelfReportConfig, example_config_path, load_config
from neuronhunter.selfreport.config import apply_overrides


def test_example_config_is_valid_and_bundled():
    assert example_config_path().is_file()
    cfg = load_config("example")
    assert cfg.model == "smollm2-135m"
    assert cfg.predictor.head == "regression"
    assert cfg.predictor.read_layer is None  # the last layer
    assert cfg.training.unfreeze == "last_k"


def test_yaml_and_json_give_the_same_config(tmp_path):
    data = {"name": "x", "selection": {"source": "explicit", "neurons": ["L1.N3", "0:5", [1, 7]]},
            "training": {"epochs": 2}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    a, b = load_config(tmp_path / "c.json"), load_config(tmp_path / "c.yaml")
    assert a == b
    assert a.selection.neurons == [NeuronRef(layer=1, neuron=3), NeuronRef(layer=0, neuron=5),
                                   NeuronRef(layer=1, neuron=7)]
    assert str(a.selection.neurons[0]) == "L1.N3"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"trainig": {}}, "trainig: unknown option"),
        ({"training": {"lr": -1}}, "training.lr"),
        ({"training": {"unfreeze": "some"}}, "training.unfreeze"),
        ({"selection": {"source": "explicit"}}, "needs a non-empty 'neurons'"),
        ({"selection": {"source": "run"}}, "needs 'run'"),
        ({"selection": {"verdict": "mono"}}, "need source 'run'"),
        ({"selection": {"source": "explicit", "neurons": ["layer1"]}}, "must look like"),
        ({"predictor": {"head": "token"}, "training": {"unfreeze": "head"}}, "token head has no separate head"),
        ({"predictor": {"answer": "x"}}, "answer must contain"),
        ({"dataset": {"splits": [0.8, 0.2, 0]}}, "must all be positive"),
    ],
)
def test_bad_configs_raise_one_line_errors(tmp_path, data, fragment):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert fragment in msg
    assert "\n" not in msg
    assert msg.startswith("bad.json: ")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("training: {epochs: 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_overrides():
    cfg = load_config("example", ["training.epochs=1", "dataset.max_tokens=500", "predictor.head=classification",
                                  "selection.layers=[1, 2]"])
    assert cfg.training.epochs == 1
    assert cfg.dataset.max_tokens == 500
    assert cfg.predictor.head == "classification"
    assert cfg.selection.layers == [1, 2]
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["epochs"])


def test_splits_are_normalised_and_fingerprint_is_stable():
    cfg = SelfReportConfig.model_validate({"dataset": {"splits": [7, 1.5, 1.5]}})
    assert sum(cfg.dataset.splits) == pytest.approx(1.0)
    assert cfg.fingerprint() == SelfReportConfig.model_validate(cfg.model_dump()).fingerprint()
