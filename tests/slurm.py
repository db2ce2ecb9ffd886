"""A real one-machine Slurm cluster for tests of the job scripts in jobs/.

``scripts/slurm_local.sh`` installs (as root, from the distribution) and starts Slurm with a
node that looks like a JURECA-DC GPU node. Tests that need it take the ``slurm`` fixture::

    from slurm import slurm  # noqa: F401  (the fixture)

    def test_job(slurm):
        job, rc = slurm.sbatch(["--account=test", "jobs/train.sbatch", "cfg.yaml"])
        assert rc == 0 and slurm.job_state(job).exit_code == "0:0"

Where Slurm cannot be installed or started (not root, no apt-get) those tests are skipped
with the reason, unless GALCF_REQUIRE_SLURM=1 (set by .ci/run), which makes that a failure.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO / "scripts" / "slurm_local.sh"


@dataclass(frozen=True)
class JobInfo:
    """The fields of ``scontrol show job`` the tests look at."""

    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, ...
    reason: str
    restarts: int  # times the job was requeued (Slurm <= 23 calls it Restarts, later RestartCnt)
    exit_code: str  # "exit status:signal", e.g. "0:0"
    stdout: str  # the batch output file
    text: str  # the whole record


def parse_job(text, job_id=""):
    """``scontrol show job`` output -> JobInfo (values are taken by key, as they never hold
    spaces for these keys)."""

    def field(key, default=""):
        m = re.search(rf"(?:^|\s){key}=(\S*)", text)
        return m.group(1) if m else default

    return JobInfo(
        job_id=field("JobId", job_id),
        state=field("JobState"),
        reason=field("Reason"),
        restarts=int(field("Restarts") or field("RestartCnt") or 0),
        exit_code=field("ExitCode"),
        stdout=field("StdOut"),
        text=text,
    )


class LocalSlurm:
    """Commands against the cluster whose configuration is ``conf``."""

    def __init__(self, conf):
        self.conf = Path(conf)
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
        }  # pytest inside a real job
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
        env["PYTHON"] = sys.executable  # the interpreter jobs/*.sbatch start (${PYTHON:-python3})
        self.env = env
        self.log_dir = self.conf.parent / "log"

    def run(self, *cmd, timeout=60, check=True, cwd=REPO):
        done = subprocess.run(list(cmd), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, cmd))} exited {done.returncode}: {done.stderr.strip()} "
                f"(Slurm logs: {self.log_dir})"
            )
        return done

    def sbatch(self, args, wait=True, timeout=300, cwd=REPO):
        """Submit ``sbatch --parsable [--wait] *args`` from ``cwd``. Returns (job id, return
        code): with ``wait`` the job's exit code (sbatch --wait), else sbatch's. A job still
        running after ``timeout`` seconds is cancelled and TimeoutError raised."""
        cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + [str(a) for a in args]
        proc = subprocess.Popen(cmd, env=self.env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline().strip()  # printed at submission, before the wait
        job_id = first.split(";")[0]
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            if job_id:
                self.run("scancel", job_id, check=False)
            raise TimeoutError(f"job {job_id} ({' '.join(cmd)}) still running after {timeout}s; cancelled") from None
        if not job_id.isdigit():
            raise RuntimeError(f"{' '.join(cmd)} submitted nothing (exit {proc.returncode}): {first} {err.strip()}")
        return job_id, proc.returncode

    def job_state(self, job_id):
        done = self.run("scontrol", "show", "job", str(job_id))
        return parse_job(done.stdout, str(job_id))

    def wait_state(self, job_id, states, timeout=60, poll=0.5):
        """Poll until the job's state is one of ``states``; returns its JobInfo."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_state(job_id)
            if info.state in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} is {info.state} (reason {info.reason}) after {timeout}s, "
                    f"waiting for {sorted(states)}"
                )
            time.sleep(poll)

    def requeue_now(self, job_id):
        """Start a requeued job soon instead of after Slurm's ~2 minute BeginTime delay.

        Not within the second of the requeue: slurmd revokes the old job credential with a
        one-second resolution and rejects a relaunch in that second ("Job credential
        revoked", the job then FAILS with exit code 1)."""
        time.sleep(2.0)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def cancel(self, job_id):
        self.run("scancel", str(job_id), check=False)


def start_local_slurm(state_dir=None):
    """Run scripts/slurm_local.sh; returns (LocalSlurm, started) or raises RuntimeError
    with the script's message. ``started``: the daemons were not running before."""
    state_dir = Path(state_dir or os.environ.get("GALCF_SLURM_DIR") or "/tmp/galcf-slurm")
    conf = state_dir / "slurm.conf"
    cluster = LocalSlurm(conf)
    was_up = (
        conf.exists()
        and shutil.which("scontrol")
        and subprocess.run(["scontrol", "ping"], env=cluster.env, capture_output=True, timeout=30).returncode == 0
    )
    if was_up and os.geteuid() != 0:  # a cluster root started earlier (.ci/run): use it as it is
        return cluster, False
    try:
        done = subprocess.run(
            ["bash", str(SETUP_SCRIPT), "start", str(state_dir)], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{SETUP_SCRIPT} failed: {exc}") from None
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or done.stdout.strip() or f"{SETUP_SCRIPT} exited {done.returncode}")
    return cluster, not was_up


@pytest.fixture(scope="session")
def slurm():
    """A running local Slurm cluster (LocalSlurm); daemons this fixture started are stopped
    at the end of the session."""
    try:
        cluster, started = start_local_slurm()
    except RuntimeError as exc:
        if os.environ.get("GALCF_REQUIRE_SLURM") == "1":
            pytest.fail(f"local Slurm cluster required (GALCF_REQUIRE_SLURM=1) but not available: {exc}")
        pytest.skip(f"no local Slurm cluster: {exc}")
    yield cluster
    if started:
        subprocess.run(["bash", str(SETUP_SCRIPT), "stop", str(cluster.conf.parent)], capture_output=True, timeout=60)
