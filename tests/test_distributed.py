"""Distributed training on CPU ranks (gloo): launcher detection, DDP and DeepSpeed against a
single process with the same global batch, exact resume, preemption signals and a killed rank."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from galcf_hpc.config import config_from_dict, dump_config
from galcf_hpc.errors import CheckpointError, ConfigError
from galcf_hpc.train import engines
from galcf_hpc.train.build import micro_batch
from galcf_hpc.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state
from galcf_hpc.train.distributed import detect, first_host, local_rank_of

LAUNCH_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "PMI_RANK",
    "OMPI_COMM_WORLD_RANK",
)


def _config(sharded, out, engine="ddp", exact=False, extra_loss=None, **train):
    loss = {"cf_warmup_epochs": 1, "cf_fraction": 0.5}
    if exact:  # only per-sample terms: the gradient of the global batch is the mean over ranks
        loss = {"mmd": 0.0, "cf_consistency": 0.0, "cf_proximity": 0.0, "cf_z2": 0.0, "z1_noise": 0.0}
    loss.update(extra_loss or {})
    cfg = config_from_dict(
        {
            "run": {"out_dir": str(out), "seed": 3, "deterministic": True},
            "data": {"shards": str(sharded.out), "image_size": 16, "crop_fraction": 0.7},
            "model": {
                "channels": [8, 16],
                "z_dim": 12,
                "z1_dim": 6,
                "flow_blocks": 2,
                "flow_hidden": 16,
                "vgg_random": True,
                "vgg_layers": ["relu1_2"],
            },
            "loss": loss,
            "train": {
                "epochs": 2,
                "global_batch": 16,
                "lr": 3e-3,
                "warmup_steps": 2,
                "log_every": 1,
                "threads": 1,
                "engine": engine,
                **train,
            },
            "explain": {"batch_size": 32},
        }
    )
    path = out.parent / f"{out.name}.yaml"
    path.write_text(dump_config(cfg))
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank, world, port):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    if world > 1:
        env.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "galcf-torch-ext"))
    return env


def _start(config, world, *args):
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "galcf_hpc.cli", "train", "--config", str(config), *args],
            env=_env(rank, world, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]


def _finish(procs, timeout=400):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    return [p.returncode for p in procs], outs


def _run(config, world, *args):
    codes, outs = _finish(_start(config, world, *args))
    assert codes == [0] * world, "\n".join(o[-3000:] for o in outs)
    return outs


def _weights(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))["model"]


def _outputs(run_dir):
    """(h, reconstruction) of the run's model on a fixed batch."""
    from galcf_hpc.explain.run import load_run

    model, _, _ = load_run(run_dir)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, h, z = model.classify(x)
        return h, model.decoder(z)


def _train_losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


def test_launcher_detection():
    torchrun = detect(
        environ={"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    )
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr, torchrun.master_port) == (
        3,
        8,
        1,
        "n1",
        1234,
    )
    assert torchrun.launcher == "torchrun/env" and torchrun.backend == ("nccl" if torch.cuda.is_available() else "gloo")
    srun = detect(
        environ={
            "SLURM_PROCID": "5",
            "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_STEP_NODELIST": "jrc[0041-0042,0107]",
            "SLURM_JOB_ID": "1234567",
        }
    )
    assert (srun.rank, srun.world_size, srun.local_rank, srun.master_addr, srun.master_port, srun.launcher) == (
        5,
        8,
        1,
        "jrc0041",
        24567,
        "srun",
    )
    batch_shell = detect(environ={"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"})
    assert (batch_shell.world_size, batch_shell.launcher) == (1, "single")
    mpi = detect(
        environ={"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h", "MASTER_PORT": "99"}
    )
    assert (mpi.rank, mpi.world_size, mpi.local_rank, mpi.master_addr, mpi.launcher) == (1, 2, 1, "h", "mpiexec")
    assert detect("cpu", environ={}).device == torch.device("cpu")
    assert first_host("jwb0001") == "jwb0001" and first_host("a[7,9-12],b3") == "a7"
    with pytest.raises(ConfigError, match="rank 4 of world size 2"):
        detect(environ={"RANK": "4", "WORLD_SIZE": "2"})


def test_deepspeed_sees_the_local_rank_of_its_device():
    """One GPU visible per task: DeepSpeed must set_device(0), not the launcher's local rank."""
    environ = {"LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    with local_rank_of(torch.device("cuda", 0), environ):
        assert environ == {"LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert environ == {"LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    environ = {}
    with pytest.raises(KeyError):
        with local_rank_of(torch.device("cuda", 1), environ):
            assert environ == {"LOCAL_RANK": "1"}
            raise KeyError  # restored also when initialisation fails
    assert environ == {}
    environ = {"LOCAL_RANK": "2"}
    with local_rank_of(torch.device("cpu"), environ):
        assert environ == {"LOCAL_RANK": "2"}
    assert set(rng_state(torch.device("cpu"))) == {"torch"}  # no GPU generator of other ranks' GPUs


def test_deepspeed_config_reduces_in_fp32_and_needs_torch_autocast(monkeypatch):
    train = config_from_dict({"train": {"zero_stage": 2, "grad_accumulation": 2}}).train
    ds = engines.deepspeed_config(train, 8, 64, bf16=True)
    assert ds["communication_data_type"] == "fp32" and ds["zero_optimization"] == {"stage": 2}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    batches = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    assert [ds[k] for k in batches] == [8, 2, 64]
    deepspeed = pytest.importorskip("deepspeed")
    assert engines._import_deepspeed() is deepspeed
    from deepspeed.runtime import constants

    monkeypatch.delattr(constants, "TORCH_AUTOCAST")
    monkeypatch.setattr(deepspeed, "__version__", "0.15.4")
    with pytest.raises(ConfigError, match=r"DeepSpeed 0\.15\.4 does not know the 'torch_autocast' setting"):
        engines._import_deepspeed()


def test_global_batch_must_divide(sharded, tmp_path):
    cfg = config_from_dict({"train": {"global_batch": 48, "grad_accumulation": 2}})
    assert micro_batch(cfg.train, 3) == (8, 48) and micro_batch(cfg.train, 1) == (24, 48)
    with pytest.raises(ConfigError, match=r"48 is not divisible by world size 5 x grad_accumulation 2"):
        micro_batch(cfg.train, 5)
    plain = config_from_dict({"train": {"batch_size": 8, "grad_accumulation": 3}})
    assert micro_batch(plain.train, 4) == (8, 96)
    config = _config(sharded, tmp_path / "odd", global_batch=15)
    codes, outs = _finish(_start(config, 2))
    assert codes == [ConfigError.exit_code] * 2 and "15 is not divisible by world size 2" in outs[0]
    assert not (tmp_path / "odd" / "checkpoints").exists()


@pytest.mark.parametrize("engine,zero", [("ddp", 0), ("deepspeed", 0), ("deepspeed", 1)])
def test_two_ranks_match_one_process(sharded, tmp_path, engine, zero):
    """Global batch 16: 1 process x 16 vs 2 ranks x 8 see the same samples per step (the
    torch back-end deals a global permutation). With per-sample loss terms only, the
    weights after 12 steps agree to float rounding; with the full objective (batch MMD,
    random counterfactual targets and noise differ per rank) the losses agree within 10 %."""
    steps = 12
    one = _config(sharded, tmp_path / "one", engine, exact=True, zero_stage=zero, stop_after_steps=steps)
    two = _config(sharded, tmp_path / "two", engine, exact=True, zero_stage=zero, stop_after_steps=steps)
    _run(one, 1)
    outs = _run(two, 2)
    assert any("rank 1/2 on" in o and "backend gloo" in o for o in outs)
    # Compare what the models compute: conv biases in front of GroupNorm get gradients that are
    # zero up to rounding, and AdamW turns that rounding into steps that change no output.
    (ha, ra), (hb, rb) = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert torch.allclose(ha, hb, atol=1e-3, rtol=1e-3) and torch.allclose(ra, rb, atol=1e-4)
    la, lb = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    assert all(abs(la[s] - lb[s]) <= 1e-3 * abs(la[s]) for s in la)
    assert abs(la[steps] - la[1]) > 0.05 * abs(la[1])  # it did train
    if zero:  # ZeRO-1 partitions only the optimiser state: the exact check above covers it (and is slow on CPU)
        return
    full_one = _config(sharded, tmp_path / "full_one", engine, zero_stage=zero, epochs=3)
    full_two = _config(sharded, tmp_path / "full_two", engine, zero_stage=zero, epochs=3)
    _run(full_one, 1)
    _run(full_two, 2)
    fa, fb = _train_losses(tmp_path / "full_one"), _train_losses(tmp_path / "full_two")
    last = max(fa)
    tail = [s for s in fa if s > last - 5]
    mean_a, mean_b = (sum(f[s] for s in tail) / len(tail) for f in (fa, fb))
    assert abs(mean_a - mean_b) <= 0.10 * abs(mean_a), (mean_a, mean_b)


def test_two_ranks_train_the_discriminator_during_and_after_the_warm_up(sharded, tmp_path):
    """loss.cf_adversarial alone: the patch discriminator learns in every step (real galaxies
    against x~ during the counterfactual warm-up, and x_cf after it), so DDP finds all of its
    parameters used on both ranks and every step of both epochs trains."""
    config = _config(sharded, tmp_path / "adv", extra_loss={"cf_adversarial": 0.5})
    _run(config, 2)
    losses = _train_losses(tmp_path / "adv")
    steps_per_epoch = max(losses) // 2
    assert sorted(losses) == list(range(1, 2 * steps_per_epoch + 1)) and steps_per_epoch >= 2
    assert any(k.startswith("discriminator.") for k in _weights(tmp_path / "adv"))


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_rank_resume_is_exact(sharded, tmp_path, engine):
    full = _config(sharded, tmp_path / "full", engine)
    _run(full, 2)
    per_epoch = load_checkpoint(latest_checkpoint(tmp_path / "full"))["step"] // 2
    stopped = _config(sharded, tmp_path / "part", engine, stop_after_steps=per_epoch + 2)  # mid-epoch 2
    _run(stopped, 2)
    state = load_checkpoint(latest_checkpoint(tmp_path / "part"))
    assert state["step"] == per_epoch + 2 and state["loader"]["step"] > 0 and len(state["ranks"]) == 2
    _run(_config(sharded, tmp_path / "part", engine), 2, "--resume")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    other = "deepspeed" if engine == "ddp" else "ddp"
    codes, outs = _finish(_start(_config(sharded, tmp_path / "part", other), 2, "--resume"))
    assert codes == [CheckpointError.exit_code] * 2 and f"written by the {engine} engine" in outs[0]


def test_mid_epoch_checkpoint_needs_the_same_world_size(sharded, tmp_path):
    _run(_config(sharded, tmp_path / "run", stop_after_steps=3), 2)
    codes, outs = _finish(_start(_config(sharded, tmp_path / "run"), 1, "--resume"))
    assert codes == [CheckpointError.exit_code] and "written mid-epoch by 2 ranks; this job has 1" in outs[0]


def _wait_for_step(run_dir, step, procs, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(
            json.loads(x).get("step", 0) >= step for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        ):
            return
        assert all(p.poll() is None for p in procs), "training ended before the signal"
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_signal_to_one_rank_stops_all_with_a_checkpoint(sharded, tmp_path):
    """SIGUSR1 reaching only rank 1: the ranks agree, save one checkpoint at the same step and
    exit 0; a resumed run finishes with the full step count and the same weights as an
    uninterrupted run (no lost or repeated step)."""
    config = _config(sharded, tmp_path / "run", epochs=4)
    procs = _start(config, 2)
    _wait_for_step(tmp_path / "run", 3, procs)
    procs[1].send_signal(signal.SIGUSR1)
    codes, outs = _finish(procs)
    assert codes == [0, 0], outs[0][-2000:]
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert "on SIGUSR1" in outs[1] and "on a stop signal" in outs[0]  # rank 0 learns it from rank 1
    assert not (tmp_path / "run" / "eval.json").exists()
    _run(_config(sharded, tmp_path / "ref", epochs=4), 2)
    total = load_checkpoint(latest_checkpoint(tmp_path / "ref"))["step"]
    assert 3 <= state["step"] < total
    _run(config, 2, "--resume")
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == total
    a, b = _weights(tmp_path / "run"), _weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_rank_fails_fast_and_keeps_the_checkpoint(sharded, tmp_path):
    config = _config(sharded, tmp_path / "run", epochs=30, checkpoint_every=2, collective_timeout_minutes=5.0)
    procs = _start(config, 2)
    _wait_for_step(tmp_path / "run", 5, procs)
    procs[1].kill()
    t0 = time.monotonic()
    codes, outs = _finish(procs, timeout=120)
    assert time.monotonic() - t0 < 60 and codes[0] != 0 and codes[1] == -signal.SIGKILL
    assert "rank 0/2: a collective operation failed" in outs[0] and "rerun the job with --resume" in outs[0]
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["step"] >= 4 and state["step"] % 2 == 0
