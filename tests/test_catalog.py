"""The catalog job: MPI run vs single process vs the model itself, kill -9 and resume,
verify, and clear errors for bad inputs and foreign output directories."""

import hashlib
import os
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from galcf_hpc import cli
from galcf_hpc.catalog.job import run_catalog
from galcf_hpc.data.classes import NUM_CLASSES
from galcf_hpc.explain.run import load_run
from galcf_hpc.loaders.augment import augment_batch
from galcf_hpc.loaders.torch import ShardDataset
from galcf_hpc.train.checkpoint import latest_checkpoint, load_checkpoint
from galcf_hpc.train.loop import train

from test_train import tiny_config

CLI = [sys.executable, "-m", "galcf_hpc.cli"]


def galcf(*args, ranks=None, timeout=180):
    """Run the CLI in a subprocess, under ``mpiexec -n ranks`` if given."""
    launcher = ["mpiexec", "-n", str(ranks)] if ranks else []
    return subprocess.run(launcher + CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def run_cli(monkeypatch, capsys, *args):
    """In-process CLI (no MPI): exit code and stderr."""
    monkeypatch.setattr(cli, "_mpi_world", lambda: None)
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


@pytest.fixture(scope="module")
def run_dir(sharded, tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog_run") / "run"
    train(tiny_config(sharded.out, out, epochs=1))
    return out


@pytest.fixture(scope="module")
def mpi_catalog(run_dir, sharded, tmp_path_factory):
    """The test split (24 galaxies) through ``mpiexec -n 2`` in units of 4 galaxies (6 units)."""
    out = tmp_path_factory.mktemp("catalog_mpi") / "out"
    res = galcf("catalog", "run", "--checkpoint", run_dir, "--input", sharded.out / "test", "--out", out,
                "--unit-size", 4, ranks=2)
    assert res.returncode == 0, res.stderr
    return out, res


def test_mpi_run_matches_single_process_and_model(mpi_catalog, run_dir, sharded, tmp_path):
    out, res = mpi_catalog
    single = run_catalog(run_dir, sharded.out / "test", tmp_path / "single", unit_size=4)
    mpi, attrs = read_all(out / "catalog.h5")
    ref, _ = read_all(tmp_path / "single" / "catalog.h5")

    dataset = ShardDataset(sharded.out / "test")
    keys = [k.decode() for k in mpi["key"]]
    n = len(dataset)
    assert keys == dataset.keys and len(set(keys)) == len(keys) == n == 24
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and sum(r["units"] for r in summary["per_rank"]) == 6
    assert single["computed_units"] == 6 and "6 computed on 2 rank(s)" in res.stdout

    np.testing.assert_array_equal(mpi["pred"], ref["pred"])
    np.testing.assert_array_equal(mpi["validity"], ref["validity"])
    for name in ("distance", "h", "msd", "ssim"):
        np.testing.assert_allclose(mpi[name], ref[name], atol=1e-4, rtol=1e-4, equal_nan=True)
    assert np.abs(mpi["image"].astype(int) - ref["image"]).max() <= 1

    # the model itself, on the evaluation transform of the same galaxies
    model, cfg, _ = load_run(run_dir)
    samples = [dataset[i] for i in range(len(dataset))]
    x = augment_batch(torch.from_numpy(np.stack([s["image"] for s in samples])), cfg.data.image_size,
                      cfg.data.crop_fraction)
    pred, _, h, z = model.classify(x)
    np.testing.assert_array_equal(mpi["pred"], pred.numpy())
    np.testing.assert_allclose(mpi["h"], h.numpy(), atol=1e-4)
    np.testing.assert_allclose(mpi["distance"], torch.cdist(h, model.means).detach().numpy(), atol=1e-4)
    np.testing.assert_array_equal(mpi["label"], [s["label"] for s in samples])
    source = [int(k[1:]) for k in keys]
    np.testing.assert_allclose(mpi["ra"], sharded.catalog.ra[source])
    np.testing.assert_allclose(mpi["dec"], sharded.catalog.dec[source])

    # target == pred: no counterfactual, the image is the reconstruction x~
    own = mpi["pred"][:, None] == np.arange(NUM_CLASSES)[None]
    assert (mpi["validity"][own] == -1).all() and set(np.unique(mpi["validity"][~own])) <= {0, 1}
    assert np.isnan(mpi["msd"][own]).all() and np.isfinite(mpi["msd"][~own]).all()
    assert (mpi["msd"][~own] >= 0).all() and (mpi["ssim"][~own] <= 1).all()
    recon = (model.decoder(z).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    rows = np.arange(n)
    assert np.abs(mpi["image"][rows, mpi["pred"]].astype(int) - recon).max() <= 1
    # validity recomputed from the stored counterfactual of one galaxy and target
    i, t = np.argwhere(~own)[0]
    x_cf, _ = model.counterfactual(z[i:i + 1], h[i:i + 1], pred[i:i + 1], torch.tensor([t]), cfg.explain.margin)
    assert mpi["validity"][i, t] == int(model.classify(x_cf)[0][0] == t)

    assert attrs["num_galaxies"] == n and list(attrs["targets"]) == list(range(NUM_CLASSES))
    assert attrs["checkpoint_sha256"] == hashlib.sha256(latest_checkpoint(run_dir).read_bytes()).hexdigest()
    assert "model:" in attrs["config"] and attrs["input"] == str((sharded.out / "test").resolve())
    ok = galcf("catalog", "verify", out)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr


def test_h5_input_targets_and_float16(run_dir, make_catalog, tmp_path):
    cat = make_catalog(n=13, size=32, keys=("images", "ra", "dec"))  # unlabelled
    out = tmp_path / "out"
    s = run_catalog(run_dir, cat.path, out, targets="Merging,3", unit_size=5, image_dtype="float16")
    assert (s["num_units"], s["skipped_units"]) == (3, 0)
    data, attrs = read_all(out / "catalog.h5")
    assert [k.decode() for k in data["key"]] == [f"g{i:07d}" for i in range(13)]
    assert (data["label"] == -1).all() and np.allclose(data["ra"], cat.ra)
    assert data["image"].shape == (13, 2, 3, 16, 16) and data["image"].dtype == np.float16
    assert list(attrs["target_names"]) == ["Merging", "In-between Round Smooth"]
    own = data["pred"][:, None] == np.array([1, 3])[None]
    assert ((data["validity"] == -1) == own).all()
    # a rerun with the same arguments computes nothing and leaves the parts as they were
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    again = run_catalog(run_dir, cat.path, out, targets="Merging,3", unit_size=5, image_dtype="float16")
    assert (again["skipped_units"], again["computed_units"]) == (3, 0)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == before


def test_kill_one_rank_then_resume(run_dir, sharded, tmp_path):
    out = tmp_path / "out"
    args = ["catalog", "run", "--checkpoint", run_dir, "--input", sharded.catalog.path, "--out", out,
            "--unit-size", 16]
    killed = galcf(*args, "--fault-kill-at-unit", 5, ranks=2)  # the rank that gets unit 5 dies (SIGKILL) mid-unit
    assert killed.returncode != 0
    parts = out / "parts"
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("unit-*.h5")}
    # unit 5 is handed out only after some rank finished a unit; units >= 5 never finish
    assert 1 <= len(done) <= 5 and all(int(name[5:11]) < 5 for name in done)
    assert list(parts.glob(".unit-000005.h5.*.tmp"))  # the killed rank's half-written part

    resumed = galcf(*args, ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} finished before (skipped), {15 - len(done)} computed" in resumed.stdout
    assert {n: (parts / n).stat().st_ino for n in done} == {n: v[0] for n, v in done.items()}
    assert {n: (parts / n).stat().st_mtime_ns for n in done} == {n: v[1] for n, v in done.items()}
    assert len(list(parts.glob("unit-*.h5"))) == 15 and not list(parts.glob(".*.tmp"))
    ok = galcf("catalog", "verify", out)
    assert ok.returncode == 0, ok.stderr
    with h5py.File(out / "catalog.h5", "r") as f:
        keys = f["key"][()]
    assert sorted(keys.tolist()) == sorted(f"g{i:07d}".encode() for i in range(240))


def test_verify_finds_deleted_part(mpi_catalog, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(mpi_catalog[0], out)
    (out / "parts" / "unit-000002.h5").unlink()
    with h5py.File(out / "catalog.h5", "r") as f:  # what a reader sees: fill values, silently
        assert (f["pred"][8:12] == -32768).all() and (f["key"][8:12] == b"").all()
        assert (f["pred"][:8] >= 0).all()
    code, err = run_cli(monkeypatch, capsys, "catalog", "verify", out)
    assert code == 2
    assert "unit-000002.h5 (galaxies 8-11) is missing" in err
    assert "'pred' holds its fill value -32768 for 4 galaxies, first index 8" in err


def test_pack_copies_every_field_into_one_file(mpi_catalog, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(mpi_catalog[0], out)
    code, _ = run_cli(monkeypatch, capsys, "catalog", "pack", out, "--out", tmp_path / "packed.h5")
    assert code == 0
    shutil.rmtree(out / "parts")  # the packed file needs no part files
    with h5py.File(tmp_path / "packed.h5", "r") as packed, h5py.File(mpi_catalog[0] / "catalog.h5", "r") as vds:
        assert set(packed) == set(vds) and not packed["pred"].is_virtual
        for name in vds:
            a, b = packed[name][()], vds[name][()]
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
        assert packed.attrs["checkpoint_sha256"] == vds.attrs["checkpoint_sha256"]
    (out / "catalog.h5").unlink()
    shutil.copytree(mpi_catalog[0], tmp_path / "holey")
    (tmp_path / "holey" / "parts" / "unit-000001.h5").unlink()
    code, err = run_cli(monkeypatch, capsys, "catalog", "pack", tmp_path / "holey")
    assert code == 2 and "is missing" in err and not (tmp_path / "holey" / "catalog_packed.h5").exists()


def test_bad_inputs_fail_cleanly(run_dir, make_catalog, mpi_catalog, tmp_path, monkeypatch, capsys):
    ckpt = latest_checkpoint(run_dir)
    cat = make_catalog(n=8, size=32)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(cat.path.read_bytes()[:3000])
    code, err = run_cli(monkeypatch, capsys, "catalog", "run", "--checkpoint", ckpt, "--input", truncated,
                        "--out", tmp_path / "o1")
    assert code == 2 and str(truncated) in err and "truncated" in err
    assert not (tmp_path / "o1").exists()
    # under MPI: rank 0 finds the problem, every rank stops with exit code 2, one message
    res = galcf("catalog", "run", "--checkpoint", ckpt, "--input", truncated, "--out", tmp_path / "o1", ranks=2)
    assert res.returncode == 2 and res.stderr.count(f"galcf-hpc: error: {truncated}") == 1
    assert not (tmp_path / "o1").exists()
    code, err = run_cli(monkeypatch, capsys, "catalog", "run", "--checkpoint", ckpt, "--input", cat.path,
                        "--out", tmp_path / "o1", "--targets", "Merging,Spiral")
    assert code == 2 and "unknown class 'Spiral'" in err and not (tmp_path / "o1").exists()

    state = load_checkpoint(ckpt)
    state["config"]["model"]["z_dim"] = 16  # weights no longer fit the config
    torch.save(state, tmp_path / "mismatch.pt")
    code, err = run_cli(monkeypatch, capsys, "catalog", "run", "--checkpoint", tmp_path / "mismatch.pt",
                        "--input", cat.path, "--out", tmp_path / "o2")
    assert code == 2 and "another model configuration" in err and "mismatch.pt" in err
    assert not (tmp_path / "o2").exists()

    # an output directory of another run (another checkpoint file): refused, nothing changes
    out = tmp_path / "out"
    shutil.copytree(mpi_catalog[0], out)
    before = tree_digest(out)
    other = load_checkpoint(ckpt)
    other["step"] += 1
    torch.save(other, tmp_path / "other.pt")
    test_split = json.loads((out / "run.json").read_text())["input"]
    code, err = run_cli(monkeypatch, capsys, "catalog", "run", "--checkpoint", tmp_path / "other.pt",
                        "--input", test_split, "--out", out, "--unit-size", 4)
    assert code == 2 and "another catalog run" in err and "checkpoint_sha256" in err
    assert tree_digest(out) == before


def test_tasks_without_a_shared_mpi_world_are_refused(tmp_path):
    """srun with an MPI plug-in that does not match mpi4py: every task would see a world of
    one and explain the whole catalog; the job refuses before touching anything."""
    env = dict(os.environ, SLURM_STEP_NUM_TASKS="4")
    res = subprocess.run([sys.executable, "-m", "galcf_hpc.cli", "catalog", "run", "--checkpoint", str(tmp_path),
                          "--input", str(tmp_path), "--out", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "started 4 tasks but each sees an MPI world of size 1" in res.stderr
    assert not (tmp_path / "out").exists()
