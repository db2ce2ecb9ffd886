"""Launcher detection and process-group set-up, in one place.

``detect()`` reads how this process was started and returns a ``DistEnv`` (rank, local
rank, world size, master address and port, device, backend):

- torchrun (or any launcher exporting them): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT;
- Slurm ``srun``: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; the master is
  MASTER_ADDR if set (jobs/train.sbatch sets it, with the InfiniBand host name on JSC
  systems), else the first host of the step's node list; the port is MASTER_PORT or
  20000 + job id mod 10000, so concurrent jobs on one node do not collide. The batch shell
  of an sbatch job has SLURM_PROCID but no SLURM_STEP_NUM_TASKS: a trainer started there
  without srun runs as a single process instead of waiting for ranks that never come;
- mpiexec (MPICH/Hydra PMI_RANK/PMI_SIZE, Open MPI OMPI_COMM_WORLD_*): rank 0's host name
  and a free port reach the other ranks through mpi4py unless MASTER_ADDR/PORT are set;
- otherwise a single process.

Device: ``cuda:<local rank>`` when CUDA is visible (and ``train.device`` allows it), or GPU
0 when the launcher made one GPU visible per task, else the CPU (``device.resolve_device``).
Backend: NCCL on GPUs, gloo on CPUs. ``configure_process`` applies the per-process torch
settings (threads, determinism, current GPU).
"""

import contextlib
import datetime
import logging
import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import resolve_device, use_device
from ..errors import ConfigError

log = logging.getLogger("galcf_hpc")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str
    device: torch.device
    backend: str

    @property
    def is_main(self):
        return self.rank == 0

    def describe(self):
        return (
            f"rank {self.rank}/{self.world_size} on {socket.gethostname()}: device {self.device}, "
            f"backend {self.backend}, local rank {self.local_rank}"
        )


def first_host(nodelist):
    """First host name of a Slurm node list such as ``jrc[0041-0044,0107],jrc0200``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ConfigError(f"cannot read the Slurm node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port():
    """A TCP port that is free now (for a rendezvous started right after)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _int(environ, *names, default=None):
    for name in names:
        if environ.get(name, "") != "":
            return int(environ[name])
    return default


def _mpi_master(environ):
    """(address, port) of rank 0, shared through mpi4py (imported only for mpiexec launches)."""
    if environ.get("MASTER_ADDR") and environ.get("MASTER_PORT"):
        return environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError(
            "started by mpiexec without MASTER_ADDR/MASTER_PORT, and mpi4py is not installed to "
            "share them; pip install 'galcf-hpc[mpi]' or export both variables"
        ) from None
    comm = MPI.COMM_WORLD
    mine = (socket.gethostname(), free_port()) if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def detect(device="auto", environ=None):
    environ = os.environ if environ is None else environ
    if environ.get("RANK") is not None and environ.get("WORLD_SIZE") is not None:
        launcher = "torchrun/env"
        rank, world, local = int(environ["RANK"]), int(environ["WORLD_SIZE"]), _int(environ, "LOCAL_RANK", default=0)
        addr, port = environ.get("MASTER_ADDR", "127.0.0.1"), _int(environ, "MASTER_PORT", default=29500)
    elif environ.get("SLURM_PROCID") is not None and environ.get("SLURM_STEP_NUM_TASKS") is not None:
        launcher = "srun"
        rank, world = int(environ["SLURM_PROCID"]), int(environ["SLURM_STEP_NUM_TASKS"])
        local = _int(environ, "SLURM_LOCALID", default=0)
        addr = environ.get("MASTER_ADDR") or first_host(
            environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
        )
        port = _int(environ, "MASTER_PORT", default=20000 + _int(environ, "SLURM_JOB_ID", default=0) % 10000)
    elif environ.get("PMI_RANK") is not None or environ.get("OMPI_COMM_WORLD_RANK") is not None:
        launcher = "mpiexec"
        rank = _int(environ, "PMI_RANK", "OMPI_COMM_WORLD_RANK")
        world = _int(environ, "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
        local = _int(environ, "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", default=0)
        addr, port = _mpi_master(environ) if world > 1 else ("127.0.0.1", 0)
    else:
        launcher, rank, world, local, addr, port = "single", 0, 1, 0, "127.0.0.1", 0
    if not 0 <= rank < world:
        raise ConfigError(f"launcher {launcher} gave rank {rank} of world size {world}")
    dev = resolve_device(device, local, option="config key 'train.device'")
    return DistEnv(rank, local, world, addr, port, launcher, dev, "nccl" if dev.type == "cuda" else "gloo")


def init_process_group(env, timeout_minutes=10.0, always=False):
    """Join the group (world size > 1, or ``always``: DeepSpeed wants one even alone). A
    peer that dies makes collectives fail instead of waiting forever: gloo reports the
    closed connection at once, NCCL after ``timeout_minutes``."""
    if dist.is_initialized() or (env.world_size == 1 and not always):
        return
    port = env.master_port or free_port()
    for key, value in (
        ("MASTER_ADDR", env.master_addr),
        ("MASTER_PORT", str(port)),
        ("RANK", str(env.rank)),
        ("WORLD_SIZE", str(env.world_size)),
        ("LOCAL_RANK", str(env.local_rank)),
    ):
        os.environ[key] = value  # DeepSpeed reads these instead of probing with mpi4py
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    dist.init_process_group(
        env.backend,
        init_method=f"tcp://{env.master_addr}:{port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def configure_process(env, threads=0, deterministic=False):
    """Per-process torch settings of a rank: intra-op threads on the CPU (``threads``, else
    Slurm's SLURM_CPUS_PER_TASK), deterministic algorithms (``run.deterministic``; with
    CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set, before the first GEMM), this rank's GPU as
    the current device (loaders and DeepSpeed allocate on the current one) and cuDNN's
    autotuner for the fixed training shapes unless the run is deterministic."""
    threads = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
    if threads > 0 and env.device.type == "cpu":
        torch.set_num_threads(threads)
    if deterministic:
        # cuBLAS GEMMs are deterministic only with a fixed workspace, set before the first one
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    use_device(env.device, benchmark=not deterministic)


@contextlib.contextmanager
def local_rank_of(device, environ=None):
    """LOCAL_RANK (and Open MPI's OMPI_COMM_WORLD_LOCAL_RANK, which DeepSpeed checks against
    it) set to the index of ``device`` while the block runs, restored afterwards.
    ``deepspeed.initialize`` calls ``torch.cuda.set_device(int(LOCAL_RANK))`` itself: with one
    GPU visible per task (psslurm, ``srun --gpu-bind``) local ranks 1-3 would name GPUs this
    process cannot see ("invalid device ordinal"). Nothing changes on the CPU."""
    environ = os.environ if environ is None else environ
    names = [
        n
        for n in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
        if device.type == "cuda" and (n == "LOCAL_RANK" or n in environ)
    ]
    saved = {n: environ.get(n) for n in names}
    environ.update({n: str(device.index) for n in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def active():
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if active():
        dist.barrier()


def any_rank(flags, device):
    """For each flag: True on every rank if it is true on any rank (one small all-reduce)."""
    if not active():
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def mean_over_ranks(values):
    """Element-wise mean over ranks of a 1-d tensor on this rank's device (one all-reduce;
    the result stays on the device)."""
    if not active():
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (plain values only)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class StopSignals:
    """SIGUSR1 (Slurm's warning before the time limit, ``--signal=USR1@...``) and SIGTERM
    (preemption, scancel) only set a flag here; the training loop reads it when it logs
    (every ``train.log_every`` steps and at the end of an epoch), the ranks agree, save a
    checkpoint together and leave."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.received = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue_slurm_job(environ=None):
    """``scontrol requeue`` this job when running under Slurm with GALCF_REQUEUE=1 (set by
    jobs/train.sbatch). Returns True when the requeue was accepted."""
    environ = os.environ if environ is None else environ
    job = environ.get("SLURM_JOB_ID")
    if not job or environ.get("GALCF_REQUEUE") != "1":
        return False
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        log.error(
            "scontrol requeue %s failed (%s); resubmit the job by hand, it resumes by itself", job, done.stderr.strip()
        )
        return False
    log.warning("job %s requeued; it continues from the checkpoint when it starts again", job)
    return True
