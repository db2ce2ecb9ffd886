"""The bad-input matrix: every case goes through the command line, exits with its error
class's code (3 config, 4 data, 5 checkpoint; galcf_hpc/errors.py) and a message that names
the file, key or sample, and prints no traceback. (Each case's deeper checks
live next to its code's tests; this file is the one list of what a user may get wrong.)"""

import json

import pytest

from galcf_hpc.cli import main
from galcf_hpc.errors import CheckpointError, ConfigError, DataError, UsageError


def _config(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def _manifest_entry(split_dir, name):
    manifest = json.loads((split_dir / "manifest.json").read_text())
    manifest["shards"][0]["tar"]["file"] = name
    (split_dir / "manifest.json").write_text(json.dumps(manifest))


# (case id, function (tmp_path, shards) -> argv, expected words of the message)
CASES = [
    (
        "config-missing",
        lambda t, s: ["config", "--config", str(t / "none.yaml")],
        ["cannot read config file", "none.yaml"],
    ),
    ("config-not-yaml", lambda t, s: ["config", "--config", _config(t, "train: [1,\n")], ["c.yaml", "not valid YAML"]),
    (
        "config-duplicate-key",
        lambda t, s: ["config", "--config", _config(t, "train:\n  lr: 1\n  lr: 2\n")],
        ["'lr' twice"],
    ),
    ("config-top-level-list", lambda t, s: ["config", "--config", _config(t, "- a\n")], ["mapping of sections"]),
    ("config-unknown-key", lambda t, s: ["config", "--config", _config(t, "train:\n  lr_max: 1\n")], ["train.lr_max"]),
    (
        "config-nan",
        lambda t, s: ["config", "--config", _config(t, "{}\n"), "--set", "train.lr=.nan"],
        ["train.lr", "finite"],
    ),
    (
        "config-range",
        lambda t, s: ["config", "--config", _config(t, "{}\n"), "--set", "train.epochs=-3"],
        ["train.epochs"],
    ),
    (
        "config-type",
        lambda t, s: ["config", "--config", _config(t, "train:\n  epochs: many\n")],
        ["train.epochs", "int"],
    ),
    ("verify-not-shards", lambda t, s: ["data", "verify", str(t)], ["splits.json", "missing"]),
    (
        "verify-truncated-tar",
        lambda t, s: _truncate(s / "train" / "shard-000001.tar", 7000) or ["data", "verify", str(s)],
        ["train/shard-000001.tar", "truncated"],
    ),
    (
        "verify-manifest-path-elsewhere",
        lambda t, s: _manifest_entry(s / "val", "/etc/passwd") or ["data", "verify", str(s)],
        ["val/manifest.json", "/etc/passwd"],
    ),
    (
        "shard-input-missing",
        lambda t, s: ["data", "shard", "--input", str(t / "no.h5"), "--out", str(t / "o")],
        ["no.h5"],
    ),
    (
        "shard-bad-fractions",
        lambda t, s: ["data", "shard", "--input", str(t / "x.h5"), "--out", str(t / "o"), "--fractions", "1", "1", "1"],
        ["--fractions", "summing to 1"],
    ),
    ("explain-no-checkpoint", lambda t, s: ["explain", "--run", str(t / "run")], ["run", "checkpoint"]),
    ("catalog-verify-nothing", lambda t, s: ["catalog", "verify", str(t / "cat")], ["catalog.h5", "does not exist"]),
    ("report-no-run", lambda t, s: ["report", "--run", str(t / "nope")], ["nope"]),
]


def _expected(case_id):
    """The error class a case must end in: a config file or option value is a config error,
    a missing checkpoint a checkpoint error, anything about input files a data error."""
    if case_id == "shard-bad-fractions":  # an option's value: a usage error
        return UsageError
    if case_id.startswith("config-"):
        return ConfigError
    return CheckpointError if case_id == "explain-no-checkpoint" else DataError


@pytest.mark.parametrize("case_id, argv_of, words", [pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input_exits_with_its_class_code_and_a_named_message(
    case_id, argv_of, words, sharded_copy, tmp_path, capsys
):
    argv = argv_of(tmp_path, sharded_copy)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == _expected(case_id).exit_code, err
    assert "Traceback" not in err and err.startswith("galcf-hpc: error:"), err
    for word in words:
        assert word in err, (word, err)


def test_usage_config_data_checkpoint_and_launch_errors_exit_differently(capsys):
    from galcf_hpc.errors import DeviceError, LaunchError, PeerLostError

    classes = (UsageError, ConfigError, DataError, CheckpointError, LaunchError, DeviceError)
    assert len({c.exit_code for c in classes}) == len(classes) and 0 not in {c.exit_code for c in classes}
    assert PeerLostError.exit_code == LaunchError.exit_code
    with pytest.raises(SystemExit) as usage:  # argparse's own usage errors
        main(["train", "--no-such-option"])
    assert usage.value.code == UsageError.exit_code == 2
    assert main(["explain", "--run", ".", "--targets", "Spiral"]) == UsageError.exit_code
    assert "--targets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls, word in ((UsageError, "usage"), (ConfigError, "configuration"), (DataError, "data")):
        assert f"{cls.exit_code} {word}" in text
    assert f"{CheckpointError.exit_code} checkpoint" in text and f"{LaunchError.exit_code} distributed" in text
    assert f"{DeviceError.exit_code} the machine" in text
