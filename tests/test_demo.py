"""The README's first command, end to end at toy scale: synth -> shard -> train (2 local
ranks) -> judges -> catalog job -> explain and report; and the demo's rank launcher."""

import json
import logging
import re
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import pytest
import torch
import yaml
from PIL import Image

from galcf_hpc import demo
from galcf_hpc.cli import main
from galcf_hpc.config import load_config
from galcf_hpc.data.shards import verify_shards
from galcf_hpc.errors import ConfigError, UsageError
from galcf_hpc.judges import DEFAULT_PANEL
from galcf_hpc.train.checkpoint import latest_checkpoint

# a model small enough for a test to train in seconds on 16 px images
TINY = [
    "data.image_size=16",
    "model.channels=[8, 16]",
    "model.z_dim=12",
    "model.z1_dim=6",
    "model.flow_blocks=2",
    "model.flow_hidden=16",
    "train.batch_size=32",
    "train.warmup_steps=2",
]


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    from test_report import assert_images_ok  # here: the launcher tests below need none of the report's imports

    sets = [
        f"data.source={tmp_path}/syn.h5",
        f"data.shards={tmp_path}/shards",
        f"run.out_dir={tmp_path}/run",
        "data.synth.n=200",
        "data.synth.size=32",
        "data.synth.workers=1",
        "data.shard_size=64",
        *TINY,
        "train.epochs=2",
        "train.time_limit_minutes=0",
        "run.demo_minutes=30",
    ]
    argv = ["demo", "--config", "configs/smoke.yaml", "--judge-epochs", "2"] + [x for s in sets for x in ("--set", s)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "validity" in out and "report: " in out
    run = tmp_path / "run"
    counts = verify_shards(tmp_path / "shards")
    assert sum(counts.values()) == 200
    ev = json.loads((run / "eval.json").read_text())
    cf = json.loads((run / "counterfactuals.json").read_text())
    assert cf["num_galaxies"] == counts["test"] and cf["overall"]["n"] == 9 * counts["test"]
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["num_galaxies"] == counts["val"]
    # trained by 2 local ranks with the smoke config's global batch
    state = torch.load(latest_checkpoint(run), weights_only=True)
    assert state["world_size"] == 2 and state["config"]["train"]["global_batch"] == 32
    assert state["config"]["train"]["batch_size"] == 16
    # each rank's one thread came from OMP_NUM_THREADS; the run keeps torch's default (every
    # core) for the report, explain and judges that load it later
    assert (
        state["config"]["train"]["threads"] == 0
        and yaml.safe_load((run / "config.yaml").read_text())["train"]["threads"] == 0
    )
    # run.demo_minutes: training had what the budget left after data and judges
    assert 0 < state["config"]["train"]["time_limit_minutes"] < 30
    # the judge panel, catalog job on the test split, report
    panel = json.loads((run / "judges" / "panel.json").read_text())
    assert sorted(panel) == sorted(spec.name for spec in DEFAULT_PANEL)
    for name, judge in panel.items():
        assert judge["split"] == "test" and judge["num_galaxies"] == counts["test"]
        assert json.loads((run / "judges" / name / "eval.json").read_text())["settings"]["epochs"] == 2
    with h5py.File(run / "catalog" / "catalog.h5", "r") as f:
        assert len(f["pred"]) == counts["test"]
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["catalog"]["num_galaxies"] == counts["test"] and rep["num_galaxies"] == counts["test"]
    assert abs(rep["classification"]["model"]["accuracy"] - cf["accuracy"]) < 1e-9
    # every judge's validity next to the model's, in explain's summary and in the report
    for name in panel:
        for numbers in (cf["overall"], rep["counterfactuals"]["overall"]):
            assert 0.0 <= numbers[f"validity_{name}"] <= 1.0
    assert cf["overall"]["validity_panel"] == pytest.approx(
        sum(cf["overall"][f"validity_{name}"] for name in panel) / len(panel)
    )
    # and every judge on the reconstructions x~ of the same galaxies, printed by explain and report
    on_recon = cf["judges_on_reconstructions"]
    assert sorted(on_recon) == sorted(panel) and rep["classification"]["judges_on_reconstructions"] == on_recon
    assert all(c["num_galaxies"] == counts["test"] and 0.0 <= c["accuracy"] <= 1.0 for c in on_recon.values())
    assert "judges' accuracy on x~" in out and "judges on the reconstructions x~" in out
    html = run / "report" / "report.html"
    srcs = assert_images_ok(html)
    assert "counterfactual_grid.png" in srcs and "tsne.png" in srcs
    # a second run reuses catalog, shards, the finished run, judges and catalog job instead of redoing them
    mtimes = {
        p: p.stat().st_mtime_ns
        for p in (
            tmp_path / "syn.h5",
            run / "judges" / "panel.json",
            run / "judges" / "cnn" / "model.pt",
            run / "catalog" / "catalog.h5",
        )
    }
    assert main(argv) == 0
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    assert Image.open(run / "report" / "tsne.png").format == "PNG"


def test_stages_in_pipeline_order():
    # the judges learn from the data alone, before the model, whose time budget their time tells;
    # explain and report share one pass over the split: the report stage writes counterfactuals.json
    assert [name for name, _ in demo.STAGES] == ["data", "judges", "train", "catalog", "report"]


def test_training_minutes_under_a_demo_budget(caplog):
    """run.demo_minutes: training gets the budget less the time used and half the judges'
    training time (the stages after training), at most train.time_limit_minutes, at least a
    minute (with a warning that the budget will be overrun); nothing without a budget."""
    cfg = load_config("configs/smoke.yaml", ["run.demo_minutes=15", "train.time_limit_minutes=0"])
    assert demo.training_minutes(cfg, 120.0, 200.0) == pytest.approx((900 - 120 - 100) / 60)
    capped = load_config("configs/smoke.yaml", ["run.demo_minutes=15", "train.time_limit_minutes=10"])
    assert demo.training_minutes(capped, 120.0, 200.0) == pytest.approx(10.0)
    assert demo.training_minutes(capped, 300.0, 200.0) == pytest.approx((900 - 300 - 100) / 60)
    with caplog.at_level(logging.WARNING, logger="galcf_hpc"):
        assert demo.training_minutes(cfg, 850.0, 200.0) == pytest.approx(demo.MIN_TRAINING_MINUTES)
    assert "overrun" in caplog.text and "run.demo_minutes" in caplog.text
    assert demo.training_minutes(load_config("configs/smoke.yaml", ["run.demo_minutes=0"]), 0.0, 0.0) is None
    with pytest.raises(ConfigError, match="run.demo_minutes"):
        load_config("configs/smoke.yaml", ["run.demo_minutes=-1"])


def test_demo_budget_reaches_the_training_ranks(tmp_path, monkeypatch):
    """The demo's training ranks get the time limit its budget leaves after the judges (whose
    panel.json says how long they trained, also when an earlier demo trained them)."""
    seen = {}

    def judges(d):
        return {"cnn": {"train_seconds": 90.0}, "resnet": {"train_seconds": 30.0}}

    def ranks(config, sets, n, cfg):
        seen["sets"], seen["cfg"] = sets, cfg
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "eval.json").write_text("{}")
        return True

    monkeypatch.setattr(demo, "STAGES", (("judges", judges), ("train", demo.stage_train)))
    monkeypatch.setattr(demo, "train_ranks", ranks)
    sets = [f"run.out_dir={tmp_path}/run", "run.demo_minutes=20", "train.time_limit_minutes=0"]
    demo.run_demo("configs/smoke.yaml", sets, ranks=2)
    limit = [s for s in seen["sets"] if s.startswith("train.time_limit_minutes=")]
    assert len(limit) == 2 and limit[0] == "train.time_limit_minutes=0"  # the budget's comes last and wins
    expected = (20 * 60 - 60) / 60  # half the judges' 120 s for the stages after training
    assert float(limit[1].split("=")[1]) == pytest.approx(expected, abs=0.05)
    assert seen["cfg"].train.time_limit_minutes == pytest.approx(expected, abs=0.05)


def test_never_more_local_ranks_than_visible_gpus(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert demo.local_ranks(None, "auto") == 1  # one-GPU machine: one rank
    with caplog.at_level(logging.WARNING, logger="galcf_hpc"):
        assert demo.local_ranks(4, "cuda") == 1
    assert "only 1 GPU(s) visible" in caplog.text
    assert demo.local_ranks(3, "cpu") == 3  # training on the CPU: GPUs do not count
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert demo.local_ranks(None, "auto") == 2 and demo.local_ranks(3, "auto") == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 1)
    assert demo.local_ranks(None, "auto") == 1
    with pytest.raises(UsageError, match="--ranks"):
        demo.local_ranks(-1, "auto")


def test_failed_rank_launch_reports_false(tmp_path, caplog):
    cfg = load_config("configs/smoke.yaml", [])
    missing = tmp_path / "missing.yaml"  # every rank exits with the config error's code
    with caplog.at_level(logging.WARNING, logger="galcf_hpc"):
        assert demo.train_ranks(missing, [], 2, cfg, poll_seconds=0.1) is False
    # the first rank to fail exits 3; a rank still starting then is killed (-9): never 0
    found = re.search(r"exit codes \[([^\]]*)\]", caplog.text)
    codes = [int(v) for v in found.group(1).split(",")]
    assert len(codes) == 2 and ConfigError.exit_code in codes and 0 not in codes


def test_stop_signal_reaches_the_training_ranks(sharded, tmp_path):
    """SIGTERM to the demo while its ranks train (a batch system's stop, `timeout`): the ranks
    get it, save a checkpoint and leave; the demo exits 130 saying how to continue, and no
    rank is left training into the run directory."""
    run = tmp_path / "run"
    sets = [
        f"data.shards={sharded.out}",
        f"run.out_dir={run}",
        *TINY,
        "model.classify_views=1",
        "train.epochs=1000",
        "train.time_limit_minutes=0",
    ]
    script = tmp_path / "launch.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            from galcf_hpc import demo
            from galcf_hpc.config import load_config
            from galcf_hpc.errors import Interrupted
            sets = {sets!r}
            cfg = load_config("configs/smoke.yaml", sets)
            try:
                demo.train_ranks("configs/smoke.yaml", sets, 2, cfg, poll_seconds=0.1)
            except Interrupted as exc:
                print(exc, flush=True)
                sys.exit(exc.exit_code)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(run) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert latest_checkpoint(run) is not None, "no epoch finished before the stop"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "stopped by SIGTERM" in out and "run the same command again" in out
    assert "stopping at step" in out  # the ranks stopped cleanly, with a checkpoint
    left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True)
    assert left.returncode == 1, f"ranks still running: {left.stdout}"
    state = torch.load(latest_checkpoint(run), weights_only=True)
    assert state["world_size"] == 2 and state["step"] >= 1
