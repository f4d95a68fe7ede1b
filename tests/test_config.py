import pytest

from moerm.config import ConfigError, load_config


def test_yaml_then_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("system: baselora\nmodel:\n  max_length: 64\ntrain:\n  lr: 0.001\n")
    cfg = load_config(y, ["train.batch_size=4", "model.lora_target_modules=[query,value]", "train.max_steps=7"])
    assert cfg.system == "baselora" and cfg.model.max_length == 64 and cfg.train.lr == 0.001
    assert cfg.train.batch_size == 4 and cfg.model.lora_target_modules == ["query", "value"]
    assert cfg.train.max_steps == 7 and cfg.model.backbone == "minilm"


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "unknown config key 'train.nope'"),
    ("train.batch_size=abc", "train.batch_size: expected an integer"),
    ("model.tuning=half", "model.tuning must be one of"),
    ("novalue", "must look like key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)
