"""Training, checkpoints, resume and explanations on a tiny model over the shared shards."""

import dataclasses
import json
import logging
import time

import pytest
import torch
from PIL import Image

from galcf_hpc.cli import main
from galcf_hpc.config import config_from_dict, load_config
from galcf_hpc.data.classes import CLASS_NAMES
from galcf_hpc.errors import CheckpointError, ConfigError, DataError
from galcf_hpc.explain.run import explain, load_run
from galcf_hpc.loaders import build_loader
from galcf_hpc.train import engines
from galcf_hpc.train.build import lr_factor
from galcf_hpc.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from galcf_hpc.train.loop import STEP_LIMIT, TIME_LIMIT, LogWindow, check_finite, stop_reason, train


def tiny_config(shards, out_dir, loader="torch", **train):
    return config_from_dict(
        {
            "run": {"out_dir": str(out_dir), "seed": 3, "deterministic": True},
            "data": {"shards": str(shards), "image_size": 16, "crop_fraction": 0.7, "loader": loader, "device": "cpu"},
            "model": {
                "channels": [8, 16],
                "z_dim": 12,
                "z1_dim": 6,
                "flow_blocks": 2,
                "flow_hidden": 16,
                "vgg_random": True,
                "vgg_layers": ["relu1_2"],
            },
            "loss": {"cf_warmup_epochs": 1, "cf_fraction": 0.5},
            "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "log_every": 2, **train},
            "explain": {"batch_size": 32},
        }
    )


@pytest.fixture(scope="module")
def trained(sharded, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = tiny_config(sharded.out, out)
    return cfg, train(cfg), out


def test_training_writes_run_directory(trained, sharded):
    cfg, result, out = trained
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["per_class_accuracy"]) == set(CLASS_NAMES)
    cm = torch.tensor(ev["confusion_matrix"])
    n_val = json.loads((sharded.out / "val" / "manifest.json").read_text())["num_samples"]
    assert cm.shape == (10, 10) and int(cm.sum()) == n_val == ev["num_galaxies"]
    assert abs(ev["accuracy"] - float(cm.diagonal().sum()) / n_val) < 1e-9
    assert 0.0 <= ev["macro_f1"] <= 1.0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in lines]
    assert kinds.count("eval") == 2 and kinds.count("train") >= 4
    train_lines = [r for r in lines if r["kind"] == "train"]
    assert "cf" in train_lines[-1] and "cf" not in train_lines[0]  # consistency term after warm-up
    assert (out / "config.yaml").exists()
    assert config_from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text())) == cfg


def test_training_reduces_loss(trained):
    _, _, out = trained
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rec = [r["pixel"] for r in lines if r["kind"] == "train"]
    assert rec[-1] < 0.8 * rec[0]


def test_checkpoint_loads_weights_only(trained):
    _, _, out = trained
    path = latest_checkpoint(out)
    state = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "scheduler", "loader", "rng", "config", "step", "version"} <= set(state)
    assert state["loader"]["epoch"] == 2 and state["loader"]["step"] == 0
    assert len(list_checkpoints(out)) <= 2


def test_retrain_into_existing_run_refuses(trained):
    cfg, _, out = trained
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    config_text = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="--resume"):
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5)))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "config.yaml").read_text() == config_text  # the refused values are not recorded


def test_resume_continues_the_schedule_at_a_changed_learning_rate(sharded, tmp_path, caplog):
    """--resume --set train.lr=X: the schedule continues at the loaded step, scaled to X."""
    part = tiny_config(sharded.out, tmp_path / "run", stop_after_steps=5)
    train(part)
    before = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    resumed = tiny_config(sharded.out, tmp_path / "run", lr=1e-4)
    with caplog.at_level(logging.WARNING, logger="galcf_hpc"):
        train(resumed, resume=True)
    assert "changed config" in caplog.text and "lr 0.003 -> 0.0001" in caplog.text
    after = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert before["scheduler"]["base_lrs"] == [3e-3] and after["scheduler"]["base_lrs"] == [1e-4]
    t, total = resumed.train, resumed.train.epochs * build_loader(resumed, "train").steps_per_epoch
    factor = lr_factor(after["step"], total, t.warmup_steps, t.min_lr_ratio)  # the loop's schedule
    assert after["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * factor)
    assert load_config(tmp_path / "run" / "config.yaml").train.lr == 1e-4


def test_fit_schedule_ends_the_schedule_where_the_time_limit_is_reached(sharded, tmp_path, monkeypatch):
    """train.fit_schedule: after the first epoch with counterfactuals, the schedule is shortened
    to the steps the time limit allows at that epoch's pace (a clock that advances one second
    per step here); the rate decays to its floor at that step, the run ends there (mid-epoch)
    and evaluates, and a resume neither refits nor trains on. Without a time limit the planned
    schedule runs to its end."""
    from galcf_hpc.train import loop

    clock = [0.0]
    monkeypatch.setattr(loop, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    step = engines.DDPEngine.micro_step

    def timed_step(self, *args, **kwargs):
        clock[0] += 1.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(engines.DDPEngine, "micro_step", timed_step)
    spe = build_loader(tiny_config(sharded.out, tmp_path / "x"), "train").steps_per_epoch
    limit = 3.5 * spe / 60  # minutes: 3.5 epochs at one second a step
    cfg = tiny_config(sharded.out, tmp_path / "run", epochs=6, time_limit_minutes=limit, fit_schedule=True)
    train(cfg)
    expected = 2 * spe + int(0.98 * 3.5 * spe - 2 * spe)  # fitted after epoch 2 (cf_warmup_epochs 1)
    assert 2 * spe < expected < 4 * spe
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert (ev["step"], ev["schedule_steps"], ev["planned_steps"]) == (expected, expected, 6 * spe)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fitted = [x for x in lines if x["kind"] == "schedule"]
    assert len(fitted) == 1 and fitted[0]["step"] == 2 * spe and fitted[0]["seconds_per_step"] == pytest.approx(1.0)
    state = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert state["step"] == expected and state["schedule"] == {"planned": 6 * spe, "total": expected, "fitted": True}
    t = cfg.train
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(t.lr * t.min_lr_ratio)
    clock[0] = 0.0
    train(cfg, resume=True)  # the fitted end is kept: nothing more to train
    again = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert again["step"] == expected and json.loads((tmp_path / "run" / "eval.json").read_text())["step"] == expected
    # without a time limit there is nothing to fit: the planned schedule, to its end
    train(tiny_config(sharded.out, tmp_path / "free", epochs=3, fit_schedule=True))
    ev = json.loads((tmp_path / "free" / "eval.json").read_text())
    assert ev["step"] == ev["schedule_steps"] == ev["planned_steps"] == 3 * spe
    assert '"kind": "schedule"' not in (tmp_path / "free" / "metrics.jsonl").read_text()


def test_fit_schedule_follows_epochs_that_slow_down(sharded, tmp_path, monkeypatch):
    """Epochs that become slower after the schedule was fitted (1.25 s a step from epoch 3 on,
    against the 1 s it was fitted on) would let the time limit cut training with the rate
    still above its floor; the refit after each later epoch, at the mean pace of the epochs
    so far, moves the end sooner instead, so the run ends as finished before the limit, at
    the refitted step, with the rate at (or a step from) its floor."""
    from galcf_hpc.train import loop

    clock, calls = [0.0], [0]
    monkeypatch.setattr(loop, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    step = engines.DDPEngine.micro_step
    spe = build_loader(tiny_config(sharded.out, tmp_path / "x"), "train").steps_per_epoch

    def timed_step(self, *args, **kwargs):  # exact binary fractions: the rule below gets the same numbers
        calls[0] += 1
        clock[0] += 1.25 if calls[0] > 2 * spe else 1.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(engines.DDPEngine, "micro_step", timed_step)
    limit = 4.6 * spe  # seconds
    cfg = tiny_config(sharded.out, tmp_path / "run", epochs=8, time_limit_minutes=limit / 60, fit_schedule=True)
    train(cfg)
    # the rule, epoch by epoch: fitted after epoch 2, then refitted at the mean pace since then
    total, elapsed, s, seconds, steps, ends = 8 * spe, 0.0, 0, 0.0, 0, []
    for epoch in range(8):
        if s >= total:
            break
        n = min(spe, total - s)
        per_step = 1.25 if s >= 2 * spe else 1.0
        s, elapsed = s + n, elapsed + n * per_step
        if n == spe and epoch >= 1:
            seconds, steps = seconds + n * per_step, steps + n
            reachable = s + int(max(0.0, 0.98 * 60 * (limit / 60) - elapsed) / (seconds / steps))
            new = min(8 * spe, max(s, reachable))
            if new != total or not ends:
                ends.append((s, new))
            total = new
    assert len(ends) >= 2 and ends[-1][1] < ends[0][1]  # moved sooner after the slow epochs
    assert elapsed < limit  # what the refits buy: the end comes before the limit
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert (ev["step"], ev["schedule_steps"]) == (total, total)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["total_steps"]) for x in lines if x["kind"] == "schedule"] == ends
    state = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert state["step"] == total and state["schedule"]["total"] == total
    # a refit that moves the end to the step just taken cannot decay that step's rate any
    # more: it was the schedule's second-to-last, a hair above the floor
    floor = cfg.train.lr * cfg.train.min_lr_ratio
    assert floor <= state["optimizer"]["param_groups"][0]["lr"] < 1.05 * floor


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_resume_is_exact(sharded, tmp_path, loader):
    """Stop one step into epoch 2, resume: the loader continues mid-epoch (DALI: from its
    pipeline checkpoint, same samples and angles) and the weights equal an uninterrupted run's."""
    full = tiny_config(sharded.out, tmp_path / "full", loader)
    train(full)
    steps = build_loader(full, "train").steps_per_epoch
    part = tiny_config(sharded.out, tmp_path / "part", loader, stop_after_steps=steps + 1)
    train(part)
    state = torch.load(latest_checkpoint(tmp_path / "part"), weights_only=True)["loader"]
    assert state["step"] == 1 and state["backend"] == loader and (loader != "dali" or state["dali"])
    train(tiny_config(sharded.out, tmp_path / "part", loader), resume=True)
    a = torch.load(latest_checkpoint(tmp_path / "full"), weights_only=True)["model"]
    b = torch.load(latest_checkpoint(tmp_path / "part"), weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_from_other_config_names_keys(trained):
    _, _, out = trained
    with pytest.raises(CheckpointError) as err:
        load_run(out, overrides=["model.z_dim=20"])
    assert "encoder.head" in str(err.value) and "shape mismatch" in str(err.value)


def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    _, _, out = trained
    data = latest_checkpoint(out).read_bytes()
    bad = tmp_path / "checkpoints" / "step-00000099.pt"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="step-00000099.pt.*truncated"):
        load_run(tmp_path)


def test_explain_writes_metrics_and_grid(trained, sharded):
    _, _, out = trained
    summary = explain(out, split="test", device="cpu")
    saved = json.loads((out / "counterfactuals.json").read_text())
    assert saved["overall"]["n"] == summary["overall"]["n"]
    n_test = json.loads((sharded.out / "test" / "manifest.json").read_text())["num_samples"]
    assert summary["num_galaxies"] == n_test
    per = saved["per_target"]
    assert set(per) == set(CLASS_NAMES)
    # every galaxy gets a counterfactual to each class it is not predicted as: 9 per galaxy
    assert sum(p["n"] for p in per.values()) == 9 * n_test == saved["overall"]["n"]
    for p in per.values():
        if p["n"]:
            assert 0.0 <= p["validity_model"] <= 1.0 and -1.0 <= p["ssim_rec"] <= 1.0 and p["msd_rec"] >= 0
            assert p["luminance_share"] is None or 0.0 <= p["luminance_share"] <= 1.0
    # no judges next to this run: the summary says so and names the command that trains them
    assert saved["judge_names"] == [] and "galcf-hpc judges train" in saved["judge_note"]
    for name in ("counterfactual_grid.png", "decoded_grid.png", "saliency_grid.png", "colour_grid.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 300


def test_explain_targets_subset(trained):
    _, _, out = trained
    summary = explain(out, split="val", targets=[5], device="cpu")
    assert list(summary["per_target"]) == ["Barred Spiral"]


def test_cli_errors_exit_with_their_class_codes(capsys, tmp_path):
    assert main(["config", "--config", "configs/smoke.yaml", "--set", "train.epoch=3"]) == ConfigError.exit_code
    assert "train.epochs" in capsys.readouterr().err
    assert main(["explain", "--run", str(tmp_path)]) == CheckpointError.exit_code
    assert "no checkpoint" in capsys.readouterr().err


def test_lr_schedule_shape():
    values = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_log_window_sums_terms_on_the_device():
    window = LogWindow(last_step=4)
    for loss, acc in ((1.0, 0.5), (2.0, 0.25), (6.0, 0.75)):
        window.add({"loss": torch.tensor(loss), "acc": torch.tensor(acc)})
    assert isinstance(window.sums, torch.Tensor) and window.count == 3  # no float() per step
    assert window.means(torch.tensor(0.5)) == pytest.approx({"acc": 0.5, "loss": 3.0, "grad_norm": 0.5})
    assert window.means()["grad_norm"] is None  # DeepSpeed ZeRO-0 reports no norm
    check_finite({"loss": 3.0, "grad_norm": None}, 4, 7)
    with pytest.raises(FloatingPointError, match=r"grad_norm became non-finite .* steps 5-7"):
        check_finite({"loss": 3.0, "grad_norm": float("inf")}, 4, 7)


def test_stop_reason_signal_first_then_limits():
    class Signals:
        received = None

    cfg = config_from_dict({"train": {"stop_after_steps": 5, "time_limit_minutes": 1.0}}).train
    assert stop_reason(cfg, Signals, time.monotonic(), 4, torch.device("cpu")) is None
    assert stop_reason(cfg, Signals, time.monotonic(), 5, torch.device("cpu")) == STEP_LIMIT
    assert stop_reason(cfg, Signals, time.monotonic() - 61, 1, torch.device("cpu")) == TIME_LIMIT
    assert stop_reason(cfg, Signals, time.monotonic() - 61, 5, torch.device("cpu"), finished=True) is None
    Signals.received = "SIGUSR1"
    assert stop_reason(cfg, Signals, time.monotonic() - 61, 5, torch.device("cpu")) == "SIGUSR1"
    assert stop_reason(cfg, Signals, time.monotonic(), 5, torch.device("cpu"), finished=True) == "SIGUSR1"


def test_non_finite_loss_stops_at_its_log_window_without_saving(sharded, tmp_path, monkeypatch):
    """A NaN loss at step 6 (log_every 4, checkpoint_every 4): found when the window of steps
    5-8 is logged -- the only host sync of those steps -- and no checkpoint after step 4."""
    real, calls, syncs = engines.batch_losses, [], []

    def poisoned(*args):
        total, terms = real(*args)
        calls.append(1)
        if len(calls) == 6:
            total = total * float("nan")
            terms = {**terms, "loss": total.detach()}
        return total, terms

    means = LogWindow.means
    monkeypatch.setattr(engines, "batch_losses", poisoned)
    monkeypatch.setattr(LogWindow, "means", lambda self, *a: syncs.append(len(calls)) or means(self, *a))
    cfg = tiny_config(sharded.out, tmp_path / "run", log_every=4, checkpoint_every=4)
    with pytest.raises(FloatingPointError, match=r"^loss.* non-finite .* steps 5-8 .* nothing was saved after step 4"):
        train(cfg)
    assert syncs == [4, 8]  # the host read the losses at steps 4 and 8 only
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000004.pt"]
    weights = load_checkpoint(latest_checkpoint(tmp_path / "run"))["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_tensorboard_gets_the_numbers_of_metrics_jsonl(sharded, tmp_path):
    """train.tensorboard: every train/eval number of metrics.jsonl is also a TensorBoard
    scalar at its step, read back with tensorboard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(sharded.out, tmp_path / "run", epochs=1, tensorboard=True)
    train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for record in lines:
        for name in ("loss", "lr", "pixel") if record["kind"] == "train" else ("accuracy", "macro_f1"):
            got = {e.step: e.value for e in events.Scalars(f"{record['kind']}/{name}")}
            assert got[record["step"]] == pytest.approx(record[name], rel=1e-6), (record["kind"], name)
    assert {"train/loss", "eval/accuracy"} <= tags and not any(t.endswith(("/step", "/epoch")) for t in tags)


def test_second_training_into_a_run_in_use_is_refused(sharded, tmp_path, foreign_lock):
    """A run directory held by a live process elsewhere: refused with its host and pid;
    nothing of the run is written."""
    run = tmp_path / "run"
    run.mkdir()
    holder = foreign_lock(run)
    with pytest.raises(CheckpointError, match=rf"run is in use by another training \(host .*pid {holder.pid}"):
        train(tiny_config(sharded.out, run))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_resume_skips_a_damaged_newest_checkpoint_and_resume_from_picks_a_step(sharded, tmp_path, caplog):
    """--resume falls back to the newest readable checkpoint (the damaged one is set aside,
    not deleted); --resume-from STEP continues an earlier step and sets the later ones aside."""
    run = tmp_path / "run"
    train(tiny_config(sharded.out, run))
    first, newest = list_checkpoints(run)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING, logger="galcf_hpc"):
        train(tiny_config(sharded.out, run, epochs=3), resume=True)
    assert f"skipping {newest}" in caplog.text and "an older checkpoint" in caplog.text
    assert newest.with_name(newest.name + ".unreadable").read_bytes() == data[: len(data) // 3]
    final = latest_checkpoint(run)
    assert load_checkpoint(final)["loader"]["epoch"] == 3 and int(final.stem[5:]) > int(first.stem[5:])
    # an explicit earlier step: the later checkpoints no longer count as the run's newest
    older = list_checkpoints(run)[0]
    train(tiny_config(sharded.out, run, epochs=4), resume_from=int(older.stem[5:]))
    assert final.with_name(final.name + ".superseded").is_file()
    assert load_checkpoint(latest_checkpoint(run))["loader"]["epoch"] == 4
    with pytest.raises(CheckpointError, match="--resume-from 999: not a checkpoint of .*it has: step-"):
        train(tiny_config(sharded.out, run, epochs=4), resume_from=999)


def test_damaged_eval_split_is_found_before_step_1(sharded_copy, tmp_path):
    (sharded_copy / "val" / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"val/manifest.json: manifest is missing"):
        train(tiny_config(sharded_copy, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
