"""A DeepSpeed resume never lets DeepSpeed unpickle code: the step file's tag is the one
galcf-hpc writes (no path of its own), no links, every states file loads weights-only.
The crafted pickles below would create a file if they ever ran."""

import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from galcf_hpc.errors import CheckpointError
from galcf_hpc.train.checkpoint import deepspeed_states, save_checkpoint


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: what an attacker's file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _run(tmp_path, tag="step-00000005"):
    run = tmp_path / "run"
    path = save_checkpoint(run, 5, {"model": {"w": torch.zeros(2)}, "engine": "deepspeed", "deepspeed_tag": tag})
    states = run / "checkpoints" / "deepspeed" / "step-00000005"
    states.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 5}, states / "mp_rank_00_model_states.pt")
    return run, path, states


def test_plain_states_pass_and_name_the_directory(tmp_path):
    run, path, _ = _run(tmp_path)
    assert deepspeed_states(path, torch.load(path, weights_only=True)) == run / "checkpoints" / "deepspeed"


@pytest.mark.parametrize("tag", ["../../elsewhere/x", "step-00000004", "/tmp/x", None])
def test_a_tag_galcf_hpc_did_not_write_is_refused(tmp_path, tag):
    _, path, _ = _run(tmp_path, tag=tag)
    with pytest.raises(CheckpointError, match=r"step-00000005\.pt names DeepSpeed tag .*refusing"):
        deepspeed_states(path, torch.load(path, weights_only=True))


def test_a_poisoned_states_file_is_refused_before_anything_runs(tmp_path):
    _, path, states = _run(tmp_path)
    marker = tmp_path / "code-ran"
    with open(states / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "wb") as f:
        pickle.dump({"optimizer": _Payload(marker)}, f)  # legacy format: still a pickle torch reads
    torch.save({"x": _Payload(marker)}, states / "mp_rank_00_model_states.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is not plain checkpoint data"):
        deepspeed_states(path, torch.load(path, weights_only=True))
    assert not marker.exists()


def test_links_out_of_the_run_are_refused(tmp_path):
    _, path, states = _run(tmp_path)
    outside = tmp_path / "outside.pt"
    torch.save({"a": torch.zeros(1)}, outside)
    (states / "mp_rank_00_model_states.pt").unlink()
    (states / "mp_rank_00_model_states.pt").symlink_to(outside)
    with pytest.raises(CheckpointError, match="is a link or not a plain file"):
        deepspeed_states(path, torch.load(path, weights_only=True))


def test_deepspeed_data_classes_are_allowed_only_when_named(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    _, path, states = _run(tmp_path)
    torch.save({"loss_scaler": LossScaler(1.0)}, states / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    state = torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match="optim_states.pt is not plain checkpoint data.*LossScaler"):
        deepspeed_states(path, state)
    assert deepspeed_states(path, state, (LossScaler,)).name == "deepspeed"


def _record(run, path):
    """Re-save the step file with the sha256 of the DeepSpeed files, as the engine does."""
    from galcf_hpc.fileio import file_sha256

    state = torch.load(path, weights_only=True)
    states = run / "checkpoints" / "deepspeed" / state["deepspeed_tag"]
    files = {p.name: file_sha256(p) for p in sorted(states.iterdir())}
    save_checkpoint(run, state["step"], {**state, "deepspeed_files": files})
    return torch.load(path, weights_only=True)


def test_files_are_the_ones_the_step_recorded(tmp_path):
    run, path, states = _run(tmp_path)
    state = _record(run, path)
    assert deepspeed_states(path, state).name == "deepspeed"
    # same size, other tensor values: loads weights-only, but is not what was saved
    torch.save({"module": {"w": torch.full((2,), 7.0)}, "global_steps": 5}, states / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt changed since .*step-00000005.pt"):
        deepspeed_states(path, state)
    state = _record(run, path)
    torch.save({"extra": torch.zeros(1)}, states / "zero_pp_rank_9_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="refusing to load files galcf-hpc did not write"):
        deepspeed_states(path, state)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    """RLIMIT_FSIZE in a child process stands in for a full disk: the write of step 6 fails,
    step 5 stays intact and loadable, no temporary file is left, the error names both."""
    run, path, _ = _run(tmp_path)
    before = path.read_bytes()
    code = textwrap.dedent(
        f"""
        import resource, torch
        from galcf_hpc.errors import CheckpointError
        from galcf_hpc.train.checkpoint import save_checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        try:
            save_checkpoint({str(run)!r}, 6, {{"model": {{"w": torch.zeros(100000)}}}})
        except CheckpointError as exc:
            print(exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "could not write checkpoint" in done.stdout and "step-00000006.pt" in done.stdout
    assert "newest complete checkpoint is" in done.stdout and "step-00000005.pt" in done.stdout
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["step"] == 5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["deepspeed", "step-00000005.pt"]
