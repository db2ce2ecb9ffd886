import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from galcf_hpc.config import Config, config_from_dict, dump_config, load_config, write_resolved_config
from galcf_hpc.errors import ConfigError


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = config_from_dict({})
    write_resolved_config(cfg, tmp_path)
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load(dump_config(cfg))["loss"]["beta"] == 3.0


def test_unknown_key_names_it_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "train.epoch" in msg and "train.epochs" in msg and str(path) in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="'trian'.*'train'"):
        config_from_dict({"trian": {}})


@pytest.mark.parametrize(
    "data, key",
    [
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"lr": True}}, "train.lr"),
        ({"model": {"channels": [32, "x"]}}, "model.channels[1]"),
        ({"model": {"vgg_weights": 3}}, "model.vgg_weights"),
        ({"data": "nope"}, "data"),
    ],
)
def test_wrong_type_names_key(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert f"'{key}'" in str(err.value)


def test_int_widens_to_float_and_none_allowed():
    cfg = config_from_dict({"train": {"lr": 1}, "model": {"vgg_weights": None}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_overrides_typed_and_validated():
    cfg = config_from_dict(
        {}, ["train.epochs=7", "model.channels=[8, 16]", "data.image_size=32", "model.vgg_weights=/x/vgg.pth"]
    )
    assert cfg.train.epochs == 7 and cfg.model.channels == [8, 16] and cfg.model.vgg_weights == "/x/vgg.pth"
    with pytest.raises(ConfigError, match="train.epochs"):
        config_from_dict({}, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="looks like|KEY=VALUE|section.key=value"):
        config_from_dict({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="train.epoch'"):
        config_from_dict({}, ["train.epoch=3"])


def test_semantic_checks():
    with pytest.raises(ConfigError, match="model.z1_dim"):
        config_from_dict({"model": {"z_dim": 16, "z1_dim": 16}})
    with pytest.raises(ConfigError, match="model.channels"):
        config_from_dict({"data": {"image_size": 40}, "model": {"channels": [8, 8, 8, 8]}})
    with pytest.raises(ConfigError, match="data.split_fractions"):
        config_from_dict({"data": {"split_fractions": [0.5, 0.5, 0.5]}})
    assert config_from_dict({}, ["explain.placement=0.75"]).explain.placement == 0.75
    assert config_from_dict({}, ["explain.placement=1"]).explain.placement == 1.0
    for bad in ("1.5", "middle", "-0.25", "nan"):
        with pytest.raises(ConfigError, match="explain.placement.*boundary, translate or a number in"):
            config_from_dict({}, [f"explain.placement={bad}"])


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        if path.name.startswith("ds_"):
            continue
        load_config(path)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_reads_exponent_floats_like_yaml_1_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-5\n  epochs: 3\n  grad_clip: .5\nloss:\n  pixel: 1E5\n")
    cfg = load_config(path, ["train.warmup_steps=10"])
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 5e-5 and cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.grad_clip == 0.5 and cfg.loss.pixel == 1e5
    cfg = load_config(path, ["train.lr=3e-4"])
    assert cfg.train.lr == 3e-4
    # a quoted value stays a string, and a float key still refuses it
    with pytest.raises(ConfigError, match="train.lr.*expected float"):
        load_config(path, ['train.lr="3e-4"'])


def test_duplicate_yaml_key_is_an_error_naming_key_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"(?s)dup.yaml.*'lr' twice \(first on line 2\)") as err:
        load_config(path)
    assert f'"{path}", line 4' in str(err.value)
    path.write_text("train:\n  lr: 0.1\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="'train' twice"):
        load_config(path)


def test_config_from_dict_leaves_the_callers_dict_alone():
    data = {"train": {"lr": 0.1}, "model": {"channels": [8, 16]}}
    before = copy.deepcopy(data)
    cfg = config_from_dict(data, ["train.lr=0.5", "model.channels=[4, 8]", "data.image_size=16"])
    assert cfg.train.lr == 0.5 and cfg.model.channels == [4, 8] and cfg.data.image_size == 16
    assert data == before


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- model\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping of sections"):
        load_config(path, ["train.lr=0.1"])
    path.write_text("train:\n")  # an empty section takes overrides
    assert load_config(path, ["train.lr=0.25"]).train.lr == 0.25


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=-3", "'train.epochs': must be >= 1, got -3"),
        ("train.lr=.nan", "'train.lr': must be a finite number"),
        ("train.lr=-0.1", "'train.lr': must be [1e-12, 10.0], got -0.1"),
        ("train.log_every=0", "'train.log_every': must be >= 1"),
        ("model.channels=[]", "'model.channels': needs at least one entry"),
        ("model.channels=[8, 0]", "'model.channels': must be [1, 4096], got 0"),
        ("model.flow_blocks=0", "'model.flow_blocks': must be [1, 64]"),
        ("model.z_dim=1000000", "'model.z_dim': must be [3, 4096]"),
        ("data.rotation_degrees=.inf", "'data.rotation_degrees': must be a finite number"),
        ("data.shard_size=0", "'data.shard_size': must be >= 1"),
        ("explain.batch_size=0", "'explain.batch_size': must be >= 1"),
        ("run.seed=-1", "'run.seed': must be [0,"),
        ("loss.pixel=-1", "'loss.pixel': must be >= 0"),
        ("loss.cf_critic=.inf", "'loss.cf_critic': must be a finite number"),
    ],
)
def test_numeric_keys_have_ranges(override, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, [override])
    assert message in str(err.value)


def test_every_config_key_is_read_by_the_package():
    """A key nobody reads is a setting that silently does nothing: every field of the config
    (all keys of configs/*.yaml among them) is read as an attribute somewhere outside
    config.py."""
    package = Path(__file__).parent.parent / "galcf_hpc"
    code = "\n".join(p.read_text() for p in package.rglob("*.py") if p.name != "config.py")

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            yield from keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [(prefix, f.name)]

    unread = [prefix + name for prefix, name in keys(Config()) if not re.search(rf"\.{name}\b", code)]
    assert not unread, f"config keys no code reads: {unread}"
    shipped = {k for path in (package.parent / "configs").glob("*.yaml") for k in yaml.safe_load(path.read_text())}
    assert shipped <= {f.name for f in dataclasses.fields(Config)}


def test_explain_describes_every_key_with_type_default_and_limits():
    from galcf_hpc.config import _all_keys, explain_key

    keys = _all_keys()
    assert "train.lr" in keys and "data.synth.n" in keys and "loss" in keys
    undescribed = [k for k in keys if "(no description)" in explain_key(k) or ": a section" in explain_key(k)]
    assert not undescribed, f"config keys without a description (add a comment next to the field): {undescribed}"
    cfg = load_config("configs/smoke.yaml")
    text = explain_key("train.lr", cfg)
    assert "type float, default 0.001" in text and "range: 1e-12 .. 10.0" in text
    assert f"in this configuration: {cfg.train.lr!r}" in text
    assert "one of: torch, dali, synthetic" in explain_key("data.loader")
    assert ">= 0 (a loss weight" in explain_key("loss.cf_critic")
    section = explain_key("train").splitlines()
    assert len(section) == 1 + len(dataclasses.fields(Config().train))
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        explain_key("trian.lr")
    with pytest.raises(ConfigError, match="no sub-keys"):
        explain_key("train.lr.x")


def test_config_explain_command(capsys):
    from galcf_hpc.cli import main

    assert main(["config", "--explain", "loss.cf_proximity", "--config", "configs/smoke.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loss.cf_proximity: L1 distance") and "in this configuration: 30.0" in out
    assert main(["config", "--explain", "loss.nope"]) == ConfigError.exit_code
    assert "unknown config key 'loss.nope'" in capsys.readouterr().err
    assert main(["config"]) == 2 and "--explain KEY" in capsys.readouterr().err
