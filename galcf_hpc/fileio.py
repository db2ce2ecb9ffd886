"""Atomic file writes: a reader never sees a half-written file under its final name."""

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success.

    On any exception the temporary file is removed and an existing file at ``path`` is
    left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600 files; give the final file the usual umask-based mode so
        # colleagues in the project group can read shards, checkpoints and catalogs.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def move_aside(path, suffix):
    """Rename ``path`` to ``<name>.<suffix>`` (``-2``, ``-3``, ... when that name is taken),
    keeping a file that must no longer count under its name; returns the new path."""
    path = Path(path)
    aside, n = path.with_name(f"{path.name}.{suffix}"), 1
    while aside.exists():  # never over an earlier one
        n += 1
        aside = path.with_name(f"{path.name}.{suffix}-{n}")
    os.replace(path, aside)
    return aside


def json_safe(x):
    """``x`` with every NaN and infinity (the accuracy of a class without galaxies) as None,
    so that it can be written as strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path, obj):
    """Write ``obj`` as indented, strict JSON (NaN as null), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_text(path, text):
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path, chunk=1 << 20):
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class DirLock:
    """One job at a time in a directory: ``<dir>/.lock`` made with O_EXCL holds the owner's
    host, pid and Slurm job id. A lock is taken over when its owner is gone: the same host
    and no such process, or the same Slurm job id (a requeued job restarts on any node).
    Otherwise ``acquire`` returns the holder's description and leaves the lock alone."""

    NAME = ".lock"

    def __init__(self, directory):
        self.path = Path(directory) / self.NAME
        self.me = {
            "host": os.uname().nodename,
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
        self.held = self.created = False

    def acquire(self):
        """None when this process holds the lock now, else a description of the holder."""
        self.created = not self.path.parent.exists()  # removed again on release if left empty
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._gone(holder):
                    return f"host {holder.get('host')}, pid {holder.get('pid')}" + (
                        f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
                    )
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # the owner is gone: take the lock over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self.me, fh)
            self.held = True
            return None
        return "another process that took it at the same moment"

    def _holder(self):
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable: a process died while writing it

    def _gone(self, holder):
        job = holder.get("slurm_job_id")
        if job and job == self.me["slurm_job_id"]:
            return True
        if holder.get("host") != self.me["host"]:
            return False
        try:
            os.kill(int(holder.get("pid")), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, TypeError, ValueError):
            return False
        return False

    def release(self):
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False
            if self.created:  # a job refused before it wrote anything leaves no directory
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()
