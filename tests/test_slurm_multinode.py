"""jobs/train.sbatch as a real two-node job: scripts/slurm_multinode.sh starts a Slurm cluster
whose nodes n1 and n2 are slurmd daemons in their own network namespaces (10.77.0.11 and
10.77.0.12 on a bridge), so rank 0 and rank 1 run on different "hosts" and gloo talks over
the veth network. Skipped where that cannot be set up (not root, no `ip`, no network
namespaces), unless GALCF_REQUIRE_SLURM=1, which makes it a failure."""

import os
import re
import shutil
import subprocess

import pytest
import yaml

from slurm import REPO, LocalSlurm
from test_slurm import RANK_LINE, assert_trained
from test_train import tiny_config

SETUP_SCRIPT = REPO / "scripts" / "slurm_multinode.sh"
NODE_ADDR = {"n1": "10.77.0.11", "n2": "10.77.0.12"}


def _unavailable(reason):
    if os.environ.get("GALCF_REQUIRE_SLURM") == "1":
        pytest.fail(f"two-node Slurm cluster required (GALCF_REQUIRE_SLURM=1) but not available: {reason}")
    pytest.skip(f"no two-node Slurm cluster: {reason}")


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory):
    """The two-node cluster (LocalSlurm on its own SLURM_CONF); stopped, with its namespaces
    and bridge removed, at the end of the module."""
    if os.geteuid() != 0:
        _unavailable("network namespaces and slurmd need root")
    if not shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
        _unavailable("no `ip` command (iproute2)")
    state_dir = os.environ.get("GALCF_SLURM2_DIR") or "/tmp/galcf-slurm2"
    try:
        done = subprocess.run(
            ["bash", str(SETUP_SCRIPT), "start", state_dir], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        done = None
        reason = f"{SETUP_SCRIPT} failed: {exc}"
    if done is None or done.returncode != 0:
        if done is not None:
            reason = done.stderr.strip() or done.stdout.strip() or f"{SETUP_SCRIPT} exited {done.returncode}"
        subprocess.run(["bash", str(SETUP_SCRIPT), "stop", state_dir], capture_output=True, timeout=120)
        _unavailable(reason)
    try:
        yield LocalSlurm(os.path.join(state_dir, "slurm.conf"))
    finally:
        subprocess.run(["bash", str(SETUP_SCRIPT), "stop", state_dir], capture_output=True, timeout=120)


WHERE_JOB = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=5
srun bash -c 'echo "task $SLURM_PROCID node $SLURMD_NODENAME host $(hostname) master $(getent hosts n1 | cut -d" " -f1)" \
    "addr $(ip -4 -o addr show eth0 | awk "{print \\$4}") netns $(readlink /proc/self/ns/net)"'
"""


def test_two_nodes_are_separate_network_hosts(slurm2, tmp_path):
    """Each task of a 2-node job runs on its own node, in its own network namespace with its
    node's address, and resolves the rendezvous host n1 to n1's address."""
    rows = dict(re.findall(r"^(n\d) (\S+)$", slurm2.run("sinfo", "-h", "-N", "-o", "%N %T").stdout, re.M))
    assert set(rows) == {"n1", "n2"} and all(s in ("idle", "mixed", "allocated") for s in rows.values()), rows
    script = tmp_path / "where.sbatch"
    script.write_text(WHERE_JOB)
    job, rc = slurm2.sbatch(["--account=test", f"--output={tmp_path}/slurm-%j.out", script], timeout=120)
    text = (tmp_path / f"slurm-{job}.out").read_text()
    assert rc == 0, text
    tasks = {
        int(m[0]): m[1:]
        for m in re.findall(r"^task (\d+) node (\S+) host (\S+) master (\S+) addr (\S+) netns (\S+)$", text, re.M)
    }
    assert sorted(tasks) == [0, 1], text
    for node, host, master, addr, _ in tasks.values():
        assert host == node and addr == f"{NODE_ADDR[node]}/24" and master == NODE_ADDR["n1"], text
    assert {t[0] for t in tasks.values()} == {"n1", "n2"}, text
    assert tasks[0][4] != tasks[1][4], text  # different network namespaces
    assert tasks[0][4] != os.readlink("/proc/self/ns/net"), text  # and neither is the test's own


def test_train_job_on_two_nodes(slurm2, sharded, tmp_path):
    """jobs/train.sbatch, unmodified, with --nodes=2 --ntasks-per-node=1: rank 0 on n1, rank 1
    on n2, the rendezvous at MASTER_ADDR=n1, gloo over the bridge; the job completes and
    leaves a checkpoint and metrics."""
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(sharded.out, run_dir, threads=1).to_dict(), sort_keys=False))
    job, rc = slurm2.sbatch(
        [
            "--account=test",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--time=30",
            f"--output={tmp_path}/slurm-%j.out",
            "jobs/train.sbatch",
            config,
            "--set",
            "train.epochs=1",
        ],
        timeout=300,
    )
    text = (tmp_path / f"slurm-{job}.out").read_text()
    info = slurm2.job_state(job)
    assert_trained(slurm2, job, rc, text, run_dir)
    assert re.search(r"(?:^|\s)NodeList=n\[1-2\](?:\s|$)", info.text), info.text
    assert re.search(r"galcf-hpc train: 2 tasks on n\[1-2\], master n1:\d+,", text), text
    ranks = {(int(m[0]), int(m[1]), int(m[2])) for m in RANK_LINE.findall(text)}
    assert ranks == {(0, 2, 0), (1, 2, 0)}, text  # local rank 0 on each node
    hosts = dict(re.findall(r"^rank (\d+)/2 on (\S+):", text, re.M))
    assert hosts == {"0": "n1", "1": "n2"}, text  # each node has its own host name (UTS namespace)
