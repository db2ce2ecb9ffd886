"""jobs/train.sbatch and the preemption path under a real local Slurm that poses as a
JURECA-DC GPU node (scripts/slurm_local.sh). Skipped where Slurm cannot be started."""

import json
import os
import re
import subprocess
import time

import pytest
import yaml

from galcf_hpc.loaders import build_loader
from galcf_hpc.train.checkpoint import latest_checkpoint, load_checkpoint
from slurm import REPO, parse_job, slurm  # noqa: F401  (slurm: the fixture)
from test_train import tiny_config

RANK_LINE = re.compile(r"^rank (\d+)/(\d+) on \S+: device \S+, backend \w+, local rank (\d+)$", re.M)


def test_parse_job_fields():
    text = (
        "JobId=17 JobName=galcf-train\n   JobState=PENDING Reason=BeginTime Dependency=(null)\n"
        "   Requeue=1 Restarts=2 BatchFlag=1 Reboot=0 ExitCode=0:15\n   StdOut=/x/runs/slurm-galcf-train-17.out\n"
    )
    info = parse_job(text)
    assert (info.job_id, info.state, info.reason, info.restarts, info.exit_code, info.stdout) == (
        "17",
        "PENDING",
        "BeginTime",
        2,
        "0:15",
        "/x/runs/slurm-galcf-train-17.out",
    )
    assert parse_job("JobId=3 JobState=RUNNING RestartCnt=1 ExitCode=0:0").restarts == 1


def test_cluster_looks_like_jureca_dc_gpu_node(slurm):
    out = slurm.run("sinfo", "-h", "-o", "%P|%c|%m|%G|%l").stdout.split()
    rows = {r.split("|")[0]: r.split("|")[1:] for r in out}
    assert set(rows) == {"dc-gpu*", "dc-gpu-devel"}  # * marks the default partition
    cpus, memory, gres, limit = rows["dc-gpu*"]
    assert (cpus, memory, gres, limit) == ("128", "512000", "gpu:4", "1-00:00:00")


@pytest.mark.parametrize(
    "site, expected",
    [
        ({"SYSTEMNAME": "jurecadc"}, "jrc0041i ib0 ib0 32"),
        ({"SYSTEMNAME": "", "GALCF_SITE": "jsc"}, "jrc0041i ib0 ib0 32"),
        ({"SYSTEMNAME": "laptop"}, "- - - -"),
    ],
)
def test_site_settings_only_on_jsc_systems(slurm, site, expected):
    unset = ("MASTER_ADDR", "GALCF_SITE", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
    env = {k: v for k, v in slurm.env.items() if k not in unset}
    env.update(site, SLURM_JOB_NODELIST="jrc[0041-0044,0107]", SLURM_CPUS_PER_TASK="32")
    done = subprocess.run(
        [
            "bash",
            "-c",
            "set -euo pipefail; source jobs/site-jsc.sh; echo ${MASTER_ADDR:--} "
            "${NCCL_SOCKET_IFNAME:--} ${GLOO_SOCKET_IFNAME:--} ${SRUN_CPUS_PER_TASK:--}",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == expected.split()


@pytest.mark.parametrize(
    "modules, expected",
    [
        (None, ["--force purge", "load Stages/2025 GCC OpenMPI Python CUDA"]),
        ("Stages/2026 GCC ParaStationMPI", ["--force purge", "load Stages/2026 GCC ParaStationMPI"]),
        ("none", []),
    ],
)
def test_site_settings_load_the_install_modules(modules, expected):
    """On JSC systems a job loads the modules galcf-hpc was installed with, not whatever
    the submitting shell had (a shell function stands in for Lmod's `module`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GALCF_MODULES", "SLURM_SUBMIT_DIR")}
    env.update(SYSTEMNAME="jurecadc", MASTER_ADDR="jrc0041i")  # set: no scontrol call
    if modules is not None:
        env["GALCF_MODULES"] = modules
    done = subprocess.run(
        ["bash", "-c", 'module() { echo "$*"; }; set -euo pipefail; source jobs/site-jsc.sh'],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines() == expected


@pytest.fixture
def train_job(slurm, sharded, tmp_path):
    """Submit jobs/train.sbatch, unmodified, on a tiny config; returns a function
    (ntasks, epochs=1, wait=True) -> (job id, sbatch exit code, Slurm log path, run directory)."""

    def submit(ntasks, epochs=1, wait=True, timeout=240, extra=()):
        run_dir = tmp_path / "run"
        config = tmp_path / "tiny.yaml"
        cfg = tiny_config(sharded.out, run_dir, threads=1)
        config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        # --time above the 10 minutes of --signal=USR1@600, or USR1 comes at once
        job, rc = slurm.sbatch(
            [
                "--account=test",
                "--nodes=1",
                f"--ntasks-per-node={ntasks}",
                "--cpus-per-task=1",
                "--time=30",
                f"--output={tmp_path}/slurm-%j.out",
                "jobs/train.sbatch",
                config,
                "--set",
                f"train.epochs={epochs}",
                *[arg for item in extra for arg in ("--set", item)],
            ],
            wait=wait,
            timeout=timeout,
        )
        return job, rc, tmp_path / f"slurm-{job}.out", run_dir

    return submit


def assert_trained(slurm, job, rc, text, run_dir):
    info = slurm.job_state(job)
    assert rc == 0 and info.exit_code == "0:0" and info.state == "COMPLETED", f"job {job} {info.state}:\n{text}"
    assert sorted((run_dir / "checkpoints").glob("step-*.pt")), text
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert any('"kind": "eval"' in line for line in metrics)
    assert "galcf-hpc train: " in text and "restart 0" in text


def test_train_job_single_task(slurm, train_job):
    job, rc, log, run_dir = train_job(ntasks=1)
    assert_trained(slurm, job, rc, log.read_text(), run_dir)


def test_train_job_two_ranks(slurm, train_job):
    job, rc, log, run_dir = train_job(ntasks=2)
    text = log.read_text()
    assert_trained(slurm, job, rc, text, run_dir)
    ranks = {(int(m[0]), int(m[1]), int(m[2])) for m in RANK_LINE.findall(text)}
    assert ranks == {(0, 2, 0), (1, 2, 1)}, text


def test_train_job_requeues_on_usr1_and_resumes(slurm, train_job, sharded):
    """The time-limit path of jobs/train.sbatch: USR1 to every task (what --signal=USR1@600
    does) -> checkpoint on all ranks -> scontrol requeue -> the job runs again and resumes."""
    job, rc, log, run_dir = train_job(ntasks=2, epochs=20, wait=False)
    try:
        wait_for(run_dir / "metrics.jsonl", 120)  # training is under way
        slurm.run("scancel", "--signal=USR1", job)
        info = slurm.wait_state(job, "PENDING", timeout=60)
        assert info.restarts == 1
        slurm.requeue_now(job)
        info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=180)
    finally:
        slurm.cancel(job)
    text = log.read_text()
    assert (info.state, info.exit_code, info.restarts) == ("COMPLETED", "0:0", 1), text
    assert "restart 0" in text and "restart 1" in text  # --open-mode=append keeps the first run's log
    stopped = re.search(r"stopping at step (\d+) .*SIGUSR1", text)
    assert stopped, text
    assert re.search(rf"resumed from \S+step-0*{stopped.group(1)}\.pt", text), text
    # the expected step count, each logged step trained once (none lost, none repeated)
    per_epoch = build_loader(tiny_config(sharded.out, run_dir), "train", rank=0, world_size=2).steps_per_epoch
    final = load_checkpoint(latest_checkpoint(run_dir))["step"]
    assert final == 20 * per_epoch == json.loads((run_dir / "eval.json").read_text())["step"]
    logged = [
        json.loads(x)["step"]
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert len(logged) == len(set(logged)) and logged == sorted(logged) and logged[-1] == final


def test_killed_rank_fails_the_job_fast_and_keeps_the_checkpoint(slurm, train_job, sharded):
    """kill -9 of one rank: the other rank's collective fails at once, srun --kill-on-bad-exit
    ends the step, the job fails within seconds (not at its time limit), and the newest
    checkpoint is complete."""
    job, rc, log, run_dir = train_job(ntasks=2, epochs=50, wait=False, extra=["train.checkpoint_every=2"])
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "checkpoints").glob("step-*.pt")):
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.3)
        pids = [line.split() for line in slurm.run("scontrol", "listpids", job).stdout.splitlines()[1:]]
        victim = next(int(p[0]) for p in pids if p[2] == "0" and p[4] == "1")  # step 0, global rank 1
        t0 = time.monotonic()
        subprocess.run(["kill", "-9", str(victim)], check=True)
        info = slurm.wait_state(job, {"FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"}, timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        slurm.cancel(job)
    text = log.read_text()
    assert info.state == "FAILED" and info.exit_code != "0:0" and elapsed < 60, (info, elapsed, text)
    assert "task 1: Killed" in text and "a collective operation failed" in text, text
    state = load_checkpoint(latest_checkpoint(run_dir))
    # written every 2 steps and at every epoch's end, by both ranks
    per_epoch = build_loader(tiny_config(sharded.out, run_dir), "train", rank=0, world_size=2).steps_per_epoch
    assert state["step"] >= 2 and (state["step"] % 2 == 0 or state["step"] % per_epoch == 0)
    assert len(state["ranks"]) == 2


def test_counterfactual_job_two_mpi_ranks_under_srun(slurm, sharded, tmp_path):
    """jobs/counterfactuals.sbatch unmodified: srun starts 2 MPI ranks (pmi2, the local
    cluster's MpiDefault), they share the units, the job verifies its own output."""
    import h5py

    from galcf_hpc.train.loop import train

    run_dir = tmp_path / "run"
    train(tiny_config(sharded.out, run_dir, epochs=1))
    out = tmp_path / "catalog"
    job, rc = slurm.sbatch(
        [
            "--account=test",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--time=30",
            f"--output={tmp_path}/slurm-%j.out",
            "jobs/counterfactuals.sbatch",
            str(run_dir),
            str(sharded.out / "test"),
            str(out),
            "--unit-size",
            "4",
        ],
        timeout=240,
    )
    text = (tmp_path / f"slurm-{job}.out").read_text()
    assert rc == 0 and slurm.job_state(job).exit_code == "0:0", text
    assert re.search(r"computed on 2 rank\(s\)", text) and "OK: " in text, text  # verify ran in the job
    ranks = [int(u) for u in re.findall(r"rank \d+: (\d+) units", text)]
    n_test = json.loads((sharded.out / "test" / "manifest.json").read_text())["num_samples"]
    assert len(ranks) == 2 and sum(ranks) == -(-n_test // 4)
    with h5py.File(out / "catalog.h5") as f:
        assert len(set(f["key"][:].tolist())) == n_test


def test_usage_error_without_config_in_default_log(slurm):
    """Also the default log location: Slurm fails a job whose log directory (runs/) is missing."""
    job, rc = slurm.sbatch(
        ["--account=test", "--ntasks-per-node=1", "--cpus-per-task=1", "jobs/train.sbatch"], timeout=60
    )
    log = REPO / "runs" / f"slurm-galcf-train-{job}.out"
    try:
        assert (rc, slurm.job_state(job).exit_code) == (2, "2:0")
        assert "usage: sbatch --account=<budget> [--nodes=N] jobs/train.sbatch CONFIG" in log.read_text()
    finally:
        log.unlink(missing_ok=True)


REQUEUE_SCRIPT = """#!/bin/bash
#SBATCH --requeue
#SBATCH --time=5
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
echo "start restart=${SLURM_RESTART_COUNT:-0}" >> "$OUT/log"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then
    echo "resumed" >> "$OUT/log"
    exit 0
fi
trap 'echo "USR1: requeue" >> "$OUT/log"; scontrol requeue "$SLURM_JOB_ID"' USR1
touch "$OUT/ready"
sleep 120 &
wait $!
"""


def wait_for(path, timeout):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.2)


def test_requeue_on_usr1_restarts_job(slurm, tmp_path):
    """The preemption path without the trainer: USR1 to the batch shell -> scontrol requeue
    -> the job runs again with SLURM_RESTART_COUNT=1."""
    script = tmp_path / "requeue.sbatch"
    script.write_text(REQUEUE_SCRIPT)
    job, rc = slurm.sbatch(
        ["--account=test", f"--export=ALL,OUT={tmp_path}", f"--output={tmp_path}/slurm-%j.out", script], wait=False
    )
    assert rc == 0
    try:
        wait_for(tmp_path / "ready", 60)
        slurm.run("scancel", "--batch", "--signal=USR1", job)
        info = slurm.wait_state(job, {"PENDING", "REQUEUED", "REQUEUE_HOLD"}, timeout=30)
        assert info.restarts == 1
        slurm.requeue_now(job)
        info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=60)
    finally:
        slurm.cancel(job)
    log = (tmp_path / "log").read_text()
    assert (info.state, info.exit_code, info.restarts) == ("COMPLETED", "0:0", 1), (
        f"{info.text}\n{log}\n{(tmp_path / f'slurm-{job}.out').read_text()}"
    )
    assert log.splitlines() == ["start restart=0", "USR1: requeue", "start restart=1", "resumed"]


SIGNAL_WATCHER = """
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
rank = os.environ["SLURM_PROCID"]
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
(out / f"ready-{rank}").touch()
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
(out / f"got-{rank}").write_text(str(bool(got)))
"""

SIGNAL_JOB = """#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=5
trap 'echo "batch shell got USR1" >> "$OUT/batch"' USR1
srun "$PYTHON" "$OUT/watcher.py" "$OUT"
echo "srun exit $?" >> "$OUT/batch"
"""


def test_usr1_without_batch_reaches_srun_tasks_only(slurm, tmp_path):
    """What `#SBATCH --signal=USR1@600` (no B:) does at the time limit, and `scancel
    --signal=USR1 JOB`: every srun task gets the signal, the batch shell does not."""
    (tmp_path / "watcher.py").write_text(SIGNAL_WATCHER)
    script = tmp_path / "signal.sbatch"
    script.write_text(SIGNAL_JOB)
    job, rc = slurm.sbatch(
        ["--account=test", f"--export=ALL,OUT={tmp_path}", f"--output={tmp_path}/slurm-%j.out", script], wait=False
    )
    try:
        wait_for(tmp_path / "ready-0", 60)
        wait_for(tmp_path / "ready-1", 10)
        slurm.run("scancel", "--signal=USR1", job)
        info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=60)
    finally:
        slurm.cancel(job)
    assert info.state == "COMPLETED"
    assert (tmp_path / "got-0").read_text() == (tmp_path / "got-1").read_text() == "True"
    assert (tmp_path / "batch").read_text() == "srun exit 0\n"
