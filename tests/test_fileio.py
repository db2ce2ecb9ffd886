import json
import os

import pytest

from galcf_hpc.fileio import DirLock, atomic_path, file_sha256, write_json


def test_atomic_path_commits_with_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_text().strip().startswith("{")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_path_failure_keeps_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_file_sha256(tmp_path):
    (tmp_path / "b").write_bytes(b"abc")
    assert file_sha256(tmp_path / "b") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_dir_lock_one_holder_and_takeover_of_dead_owners(tmp_path, monkeypatch, foreign_lock):
    # a live process elsewhere holds it: refused with its host and pid, lock untouched
    holder = foreign_lock(tmp_path)
    lock_file = tmp_path / ".lock"
    lock = DirLock(tmp_path)
    assert lock.acquire() == f"host {os.uname().nodename}, pid {holder.pid}"
    assert json.loads(lock_file.read_text())["pid"] == holder.pid and not lock.held
    holder.kill()
    holder.wait()
    # its process is gone: taken over
    assert lock.acquire() is None and lock.held
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()
    # another host's lock is respected, unless it is this Slurm job's (a requeued job)
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job_id": "77"}))
    assert "host elsewhere, pid 1, Slurm job 77" == DirLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    again = DirLock(tmp_path)
    assert again.acquire() is None and json.loads(lock_file.read_text())["slurm_job_id"] == "77"
    again.release()


def test_write_json_is_strict_json(tmp_path):
    """NaN and infinities (a class without galaxies) are written as null, nested anywhere:
    the file parses with a strict JSON reader."""
    import math

    path = tmp_path / "s.json"
    write_json(path, {"acc": {"a": 0.5, "b": math.nan}, "rows": [1.0, math.inf, (-math.inf, 2)]})

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded == {"acc": {"a": 0.5, "b": None}, "rows": [1.0, None, [None, 2]]}
