"""The catalog job: MPI run vs single process vs the model itself and the shared
counterfactual pass (judges included), kill -9 and resume, damaged and foreign part files
moved aside and recomputed, verify (never a crash, every bad part named), readers that
never read another catalog's parts, and clear errors for bad inputs and foreign output
directories."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from galcf_hpc import cli
from galcf_hpc.catalog.job import run_catalog, verify_catalog
from galcf_hpc.catalog.render import render, thumbnails
from galcf_hpc.catalog.store import pack_catalog, thumbnail_size
from galcf_hpc.data.classes import NUM_CLASSES
from galcf_hpc.errors import CheckpointError, DataError, LaunchError, UsageError
from galcf_hpc.explain.run import load_run
from galcf_hpc.judges import load_judges
from galcf_hpc.judges.nets import build_judge, save_judge
from galcf_hpc.loaders.augment import augment_batch
from galcf_hpc.loaders.torch import ShardDataset
from galcf_hpc.model.evaluation import explain_batch
from galcf_hpc.report.collect import catalog_summary
from galcf_hpc.train.checkpoint import latest_checkpoint, load_checkpoint
from galcf_hpc.train.loop import train
from test_train import tiny_config

CLI = [sys.executable, "-m", "galcf_hpc.cli"]
# two tiny judges trained next to the test run: one colour CNN, one luminance-only ResNet
JUDGES = (("cnn", "plain_cnn", "colour"), ("resnet_grey", "resnet", "luminance"))


def galcf(*args, ranks=None, timeout=600):
    """Run the CLI in a subprocess, under ``mpiexec -n ranks`` if given (the timeout only guards
    against a hang: on 2 cores shared with other work a run can take minutes)."""
    launcher = ["mpiexec", "-n", str(ranks)] if ranks else []
    return subprocess.run(launcher + CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def run_cli(monkeypatch, capsys, *args):
    """In-process CLI (no MPI): exit code and stderr."""
    monkeypatch.setattr(cli, "_mpi_world", lambda: None)
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def tree_digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def write_judges(run_dir, cfg, images, labels, specs=JUDGES, steps=30, seed=0):
    """Train tiny judges on the evaluation transform of ``images`` and save them where
    ``galcf-hpc judges train`` puts them (RUN/judges/<name>/model.pt)."""
    x = augment_batch(torch.from_numpy(images), cfg.data.image_size, cfg.data.crop_fraction)
    y = torch.as_tensor(labels)
    for i, (name, family, input) in enumerate(specs):
        torch.manual_seed(seed + i)
        judge = build_judge(family, (8, 16), input)
        opt = torch.optim.Adam(judge.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = F.cross_entropy(judge(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        (run_dir / "judges" / name).mkdir(parents=True, exist_ok=True)
        save_judge(
            run_dir / "judges" / name / "model.pt",
            judge.eval(),
            {"family": family, "channels": [8, 16], "input": input, "num_classes": NUM_CLASSES},
            {"name": name},
        )


@pytest.fixture(scope="module")
def run_dir(sharded, tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog_run") / "run"
    cfg = tiny_config(sharded.out, out, epochs=1)
    train(cfg)
    write_judges(out, cfg, sharded.catalog.images, sharded.catalog.labels)
    return out


@pytest.fixture(scope="module")
def mpi_catalog(run_dir, sharded, tmp_path_factory):
    """The test split (24 galaxies) through ``mpiexec -n 2`` in units of 4 galaxies (6 units)."""
    out = tmp_path_factory.mktemp("catalog_mpi") / "out"
    res = galcf(
        "catalog",
        "run",
        "--checkpoint",
        run_dir,
        "--input",
        sharded.out / "test",
        "--out",
        out,
        "--unit-size",
        4,
        ranks=2,
    )
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

    assert set(mpi) == set(ref) >= {"validity_cnn", "validity_resnet_grey", "luminance_share", "z"}
    np.testing.assert_array_equal(mpi["pred"], ref["pred"])
    for name in ("validity", "validity_cnn", "validity_resnet_grey"):
        np.testing.assert_array_equal(mpi[name], ref[name])
    for name in ("distance", "h", "z", "msd", "ssim", "luminance_share"):
        np.testing.assert_allclose(mpi[name], ref[name], atol=1e-4, rtol=1e-4, equal_nan=True)
    assert np.abs(mpi["image"].astype(int) - ref["image"]).max() <= 1

    # the model itself, on the evaluation transform of the same galaxies
    model, cfg, _ = load_run(run_dir)
    samples = [dataset[i] for i in range(len(dataset))]
    x = augment_batch(
        torch.from_numpy(np.stack([s["image"] for s in samples])), cfg.data.image_size, cfg.data.crop_fraction
    )
    pred, _, h, z = model.classify(x)
    np.testing.assert_array_equal(mpi["pred"], pred.numpy())
    np.testing.assert_allclose(mpi["h"], h.numpy(), atol=1e-4)
    np.testing.assert_allclose(mpi["z"], z.numpy(), atol=1e-4)
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
    for name in ("validity_cnn", "validity_resnet_grey"):
        assert (mpi[name][own] == -1).all() and set(np.unique(mpi[name][~own])) <= {0, 1}
    share = mpi["luminance_share"]
    assert np.isnan(share[own]).all() and (np.isnan(share[~own]) | ((share[~own] >= 0) & (share[~own] <= 1))).all()
    recon = (model.decoder(z).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    rows = np.arange(n)
    assert np.abs(mpi["image"][rows, mpi["pred"]].astype(int) - recon).max() <= 1
    # validity recomputed from the stored counterfactual of one galaxy and target
    i, t = np.argwhere(~own)[0]
    x_cf, _ = model.counterfactual(z[i : i + 1], h[i : i + 1], pred[i : i + 1], torch.tensor([t]), cfg.explain.margin)
    assert mpi["validity"][i, t] == int(model.classify(x_cf)[0][0] == t)

    assert attrs["num_galaxies"] == n and list(attrs["targets"]) == list(range(NUM_CLASSES))
    assert attrs["checkpoint_sha256"] == hashlib.sha256(latest_checkpoint(run_dir).read_bytes()).hexdigest()
    assert "model:" in attrs["config"] and attrs["input"] == str((sharded.out / "test").resolve())
    judge_files = [run_dir / "judges" / name / "model.pt" for name, _, _ in JUDGES]
    assert list(attrs["judge_names"]) == [name for name, _, _ in JUDGES]
    assert list(attrs["judge_sha256"]) == [hashlib.sha256(f.read_bytes()).hexdigest() for f in judge_files]
    assert json.loads((out / "run.json").read_text())["judges"] == dict(
        zip(attrs["judge_names"], attrs["judge_sha256"])
    )
    ok = galcf("catalog", "verify", out)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr


def test_catalog_matches_explain_batch_with_judges(mpi_catalog, run_dir, sharded):
    """validity (model and every judge), luminance share, z and the images of the catalog are
    what the shared counterfactual pass gives for the same galaxies in the same batches."""
    data, attrs = read_all(mpi_catalog[0] / "catalog.h5")
    model, cfg, _ = load_run(run_dir)
    judges, note = load_judges(run_dir)
    assert list(judges) == list(attrs["judge_names"]) == ["cnn", "resnet_grey"] and "resnet" in note
    dataset = ShardDataset(sharded.out / "test")
    x = augment_batch(
        torch.from_numpy(np.stack([dataset[i]["image"] for i in range(len(dataset))])),
        cfg.data.image_size,
        cfg.data.crop_fraction,
    )
    targets = [int(t) for t in attrs["targets"]]
    for s in range(0, len(x), 4):  # the catalog's batches: units of 4 galaxies
        rows = slice(s, s + 4)
        ref = explain_batch(
            model,
            x[rows],
            targets,
            cfg.explain.margin,
            judges,
            cfg.explain.background_fraction,
            keep_images=True,
            chunk=cfg.explain.batch_size,
            placement=cfg.explain.placement,
        )
        np.testing.assert_array_equal(data["validity"][rows], ref.valid["model"].numpy())
        for name in judges:
            np.testing.assert_array_equal(data[f"validity_{name}"][rows], ref.valid[name].numpy())
        np.testing.assert_allclose(
            data["luminance_share"][rows], ref.change["luminance_share"].numpy(), atol=1e-4, equal_nan=True
        )
        np.testing.assert_allclose(data["msd"][rows], ref.change["msd_rec"].numpy(), atol=1e-5, equal_nan=True)
        np.testing.assert_allclose(data["z"][rows], ref.z.numpy(), atol=1e-4)
        cf = (ref.cf_images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        assert np.abs(data["image"][rows].astype(int) - cf).max() <= 1
    counted = data["validity_cnn"][data["validity_cnn"] >= 0]
    assert counted.size == len(x) * (NUM_CLASSES - 1)


def test_probabilities_margin_and_mislabel_score(mpi_catalog):
    data, attrs = read_all(mpi_catalog[0] / "catalog.h5")
    prob, distance, label, pred = data["prob"], data["distance"], data["label"], data["pred"]
    np.testing.assert_allclose(prob.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(prob.argmax(1), pred)
    # the mixture's posterior with equal class weights: softmax of -d^2 / 2
    expected = np.exp(-0.5 * distance.astype(np.float64) ** 2)
    np.testing.assert_allclose(prob, expected / expected.sum(1, keepdims=True), atol=1e-5)
    top = np.sort(prob, 1)
    np.testing.assert_allclose(data["margin"], top[:, -1] - top[:, -2], atol=1e-6)
    rows = np.arange(len(label))
    np.testing.assert_allclose(data["mislabel_score"], distance[rows, label] - distance.min(1), atol=1e-5)
    assert (data["mislabel_score"][pred == label] == 0).all() and (data["mislabel_score"][pred != label] > 0).all()
    assert attrs["images"] == "full" and attrs["decode_batch"] > 0


def test_default_unit_size_and_a_resume_keeps_its_units(run_dir, sharded, tmp_path):
    fresh = run_catalog(run_dir, sharded.out / "test", tmp_path / "auto")
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["unit_size"] == 256
    assert fresh["num_units"] == 1 == fresh["computed_units"]
    run_catalog(run_dir, sharded.out / "test", tmp_path / "four", unit_size=4)
    again = run_catalog(run_dir, sharded.out / "test", tmp_path / "four")  # no --unit-size: the run's own
    assert again["num_units"] == 6 and again["skipped_units"] == 6 and again["computed_units"] == 0


def test_thumbnails_are_the_mean_over_each_footprint():
    x = torch.rand(2, 9, 3, 64, 64)
    small = thumbnails(x, 16)
    assert small.shape == (2, 9, 3, 16, 16) and small.dtype == torch.uint8
    mean = x.reshape(2, 9, 3, 16, 4, 16, 4).mean((-3, -1))
    assert (small.int() - (mean * 255).round().int()).abs().max() <= 1
    assert torch.equal(
        thumbnails(torch.full((1, 3, 32, 32), 0.5), 16), torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)
    )


def test_images_none_renders_what_full_stores(mpi_catalog, run_dir, sharded, tmp_path, monkeypatch, capsys):
    """A catalog without images, made in one process with other work units (so other batches)
    than the 2-rank run with --images auto (full here), renders every counterfactual of every
    galaxy byte for byte as the full run stored it; thumbnails are the area means."""
    full, full_attrs = read_all(mpi_catalog[0] / "catalog.h5")
    run_catalog(run_dir, sharded.out / "test", tmp_path / "none", unit_size=5, images="none")
    run_catalog(run_dir, sharded.out / "test", tmp_path / "thumbs", unit_size=7, images="thumbnails")
    none, attrs = read_all(tmp_path / "none" / "catalog.h5")
    thumbs, _ = read_all(tmp_path / "thumbs" / "catalog.h5")
    assert attrs["images"] == "none" and "image" not in none and "thumbnail" not in none
    np.testing.assert_array_equal(none["pred"], full["pred"])
    targets = [int(t) for t in attrs["targets"]]
    for i in range(len(none["key"])):
        r = render(tmp_path / "none", index=i)
        assert r["targets"] == targets and r["key"] == none["key"][i].decode()
        np.testing.assert_array_equal(r["images"], full["image"][i])
    one = render(tmp_path / "none", key=none["key"][3].decode(), targets=[targets[-1], 0])
    np.testing.assert_array_equal(one["images"], full["image"][3][[-1, 0]])

    r, size = full["image"].shape[-1], thumbs["thumbnail"].shape[-1]
    assert size == thumbnail_size(r) == min(r, max(16, r // 4))
    assert thumbs["thumbnail"].shape[1:] == (len(targets), 3, size, size)
    k = r // size  # the tiny test model's 16 px: thumbnails of the full size (k = 1)
    area = full["image"].reshape(*full["image"].shape[:-2], size, k, size, k).mean((-3, -1))
    assert np.abs(thumbs["thumbnail"].astype(float) - area).max() <= 1
    assert thumbnail_size(256) == 64 and thumbnail_size(64) == 16 and thumbnail_size(32) == 16

    parts = {d: sum(f.stat().st_size for f in (tmp_path / d / "parts").iterdir()) for d in ("none", "thumbs")}
    full_parts = sum(f.stat().st_size for f in (mpi_catalog[0] / "parts").iterdir())
    assert parts["none"] < parts["thumbs"] < full_parts

    # the command line: one target of one galaxy into a PNG of exactly those pixels
    key = none["key"][5].decode()
    out = tmp_path / "cf.png"
    code, err = run_cli(
        monkeypatch, capsys, "catalog", "render", tmp_path / "none", "--key", key, "--target", "1", "--out", out
    )
    assert code == 0, err
    with Image.open(out) as png:
        np.testing.assert_array_equal(np.asarray(png), full["image"][5][1].transpose(1, 2, 0))
    # another checkpoint than the catalog's, and a key that is not there
    other = _other_checkpoint(latest_checkpoint(run_dir), tmp_path)
    with pytest.raises(DataError, match="sha256 differs"):
        render(tmp_path / "none", index=0, checkpoint=other)
    with pytest.raises(UsageError, match="no galaxy with key 'nope'"):
        render(tmp_path / "none", key="nope")


def test_h5_input_targets_and_float16(run_dir, make_catalog, tmp_path, caplog, foreign_lock):
    cat = make_catalog(n=13, size=32, keys=("images", "ra", "dec"))  # unlabelled
    out = tmp_path / "out"
    # a checkpoint with no judges next to it: validity by the model only, and a warning
    ckpt = tmp_path / "elsewhere" / "checkpoints" / "step.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(latest_checkpoint(run_dir), ckpt)
    with caplog.at_level(logging.WARNING, logger="galcf_hpc"):
        s = run_catalog(ckpt, cat.path, out, targets="Merging,3", unit_size=5, image_dtype="float16")
    assert "galcf-hpc judges train" in caplog.text and "no judges" in caplog.text
    assert (s["num_units"], s["skipped_units"], s["judges"]) == (3, 0, [])
    data, attrs = read_all(out / "catalog.h5")
    assert not [k for k in data if k.startswith("validity_")] and len(attrs["judge_names"]) == 0
    assert data["luminance_share"].shape == (13, 2) and data["z"].dtype == np.float32
    assert verify_catalog(out)["num_galaxies"] == 13
    assert [k.decode() for k in data["key"]] == [f"g{i:07d}" for i in range(13)]
    assert (data["label"] == -1).all() and np.allclose(data["ra"], cat.ra)
    assert data["image"].shape == (13, 2, 3, 16, 16) and data["image"].dtype == np.float16
    assert list(attrs["target_names"]) == ["Merging", "In-between Round Smooth"]
    own = data["pred"][:, None] == np.array([1, 3])[None]
    assert ((data["validity"] == -1) == own).all()
    # a rerun with the same arguments computes nothing and leaves the parts as they were
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    again = run_catalog(ckpt, cat.path, out, targets="Merging,3", unit_size=5, image_dtype="float16")
    assert (again["skipped_units"], again["computed_units"]) == (3, 0)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == before
    assert not (out / ".lock").exists()  # released at the end
    # a second job while one holds the directory (a live process here): refused, nothing touched
    holder = foreign_lock(out)
    with pytest.raises(DataError, match=rf"out is in use by another catalog job \(host .*pid {holder.pid}"):
        run_catalog(ckpt, cat.path, out, targets="Merging,3", unit_size=5, image_dtype="float16")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == before


def test_kill_one_rank_then_resume(run_dir, sharded, tmp_path):
    out = tmp_path / "out"
    args = ["catalog", "run", "--checkpoint", run_dir, "--input", sharded.catalog.path, "--out", out, "--unit-size", 16]
    killed = galcf(*args, "--fault-kill-at-unit", 5, ranks=2)  # the rank that gets unit 5 dies (SIGKILL) mid-unit
    assert killed.returncode != 0
    parts = out / "parts"
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("unit-*.h5")}
    finished = {int(name[5:11]) for name in done}
    # What must hold whatever the timing: a rank asks for a unit only after finishing its
    # last one, and the other rank holds at most one, so when unit 5 is handed out at least
    # four of units 0-4 are finished. Unit 5 never finishes. The other rank may still finish
    # its unit (one of 0-4, or 6, 7, ...) before the abort reaches it: no bound from above.
    assert 5 not in finished and len(finished & set(range(5))) >= 4
    # the killed rank's part was being assembled in memory: nothing of it on disk. A kill
    # during the final write would leave a temporary file, which the next start removes
    assert not (parts / "unit-000005.h5").exists()
    (parts / ".unit-000005.h5.x1y2z3.tmp").write_bytes(b"half a part")

    resumed = galcf(*args, ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} finished before (skipped), {15 - len(done)} computed" in resumed.stdout
    # finished units are untouched (same inode, same modification time); the rest recomputed
    assert {n: (parts / n).stat().st_ino for n in done} == {n: v[0] for n, v in done.items()}
    assert {n: (parts / n).stat().st_mtime_ns for n in done} == {n: v[1] for n, v in done.items()}
    assert len(list(parts.glob("unit-*.h5"))) == 15 and not list(parts.glob(".*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped_units"], summary["computed_units"]) == (len(done), 15 - len(done))
    assert summary["rejected_parts"] == []  # what a killed run finished is whole
    assert sum(r["units"] for r in summary["per_rank"]) == 15 - len(done)
    ok = galcf("catalog", "verify", out)
    assert ok.returncode == 0, ok.stderr
    with h5py.File(out / "catalog.h5", "r") as f:
        keys = f["key"][()]
    assert keys.tolist() == [f"g{i:07d}".encode() for i in range(240)]  # every key exactly once, in order


def test_verify_finds_deleted_part_and_changed_judge(mpi_catalog, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(mpi_catalog[0], out)
    # the judges recorded in the catalog are no longer the files they were
    judges = tmp_path / "judges"
    (judges / "cnn").mkdir(parents=True)
    with h5py.File(out / "catalog.h5", "a") as f:
        shutil.copy(Path(f.attrs["judges_dir"]) / "resnet_grey" / "model.pt", judges / "cnn" / "model.pt")
        f.attrs["judges_dir"] = str(judges)
    code, err = run_cli(monkeypatch, capsys, "catalog", "verify", out)
    assert (
        code == DataError.exit_code
        and f"judge {judges / 'cnn' / 'model.pt'} has changed since the catalog was made" in err
    )
    assert "is missing" not in err

    (out / "parts" / "unit-000002.h5").unlink()
    with h5py.File(out / "catalog.h5", "r") as f:  # what a reader sees: fill values, silently
        assert (f["pred"][8:12] == -32768).all() and (f["key"][8:12] == b"").all()
        assert (f["validity_cnn"][8:12] == -128).all() and (f["pred"][:8] >= 0).all()
    code, err = run_cli(monkeypatch, capsys, "catalog", "verify", out)
    assert code == DataError.exit_code
    assert "unit-000002.h5 (galaxies 8-11) is missing" in err and "values were not read through" in err
    assert "fill value" not in err  # nothing is read through the virtual datasets with a part missing

    # a part whose every attribute and shape is right but whose rows were never written
    shutil.copy(mpi_catalog[0] / "parts" / "unit-000002.h5", out / "parts" / "unit-000002.h5")
    with h5py.File(out / "parts" / "unit-000002.h5", "a") as f:
        f["pred"][1:3] = -32768
    code, err = run_cli(monkeypatch, capsys, "catalog", "verify", out)
    assert code == DataError.exit_code and "'pred' holds its fill value -32768 for 2 galaxies, first index 9" in err


def _catalog_run(ckpt, input_path, out):
    """run_catalog with units of 2 galaxies and 2 targets (quick on 2 shared cores); returns
    (summary, catalog arrays)."""
    summary = run_catalog(ckpt, input_path, out, unit_size=2, targets="Merging,3")
    return summary, read_all(out / "catalog.h5")[0]


def _other_checkpoint(ckpt, tmp_path):
    """The same weights under another sha256 (one more step recorded), in a run directory
    with the same judges next to it: its catalog rows are the same, its provenance is not."""
    other = load_checkpoint(ckpt)
    other["step"] += 1
    path = tmp_path / "other_run" / "checkpoints" / "step-other.pt"
    path.parent.mkdir(parents=True)
    torch.save(other, path)
    shutil.copytree(ckpt.parent.parent / "judges", path.parent.parent / "judges")
    return path


def test_a_resume_at_another_precision_recomputes_every_part(run_dir, make_catalog, tmp_path, monkeypatch, caplog):
    """Every part records the precision of its model pass, catalog.h5 the catalog's. Resumed
    where the model runs at another precision (the same checkpoint on a CPU with native bf16
    and train.cpu_bf16, or on a GPU), every finished part of the other precision is moved
    aside and computed again: a catalog is one function, never a mix of fp32 and bf16 units."""
    import dataclasses

    from galcf_hpc import device
    from galcf_hpc.catalog import job

    ckpt = latest_checkpoint(run_dir)
    cat = make_catalog(n=6, size=32, seed=0)
    out = tmp_path / "out"

    def precisions():
        with h5py.File(out / "catalog.h5", "r") as f:
            whole = str(f.attrs["precision"])
        parts = {}
        for part in sorted((out / "parts").glob("unit-*.h5")):
            with h5py.File(part, "r") as f:
                parts[part.name] = str(f.attrs["precision"])
        return whole, parts

    first, fp32 = _catalog_run(ckpt, cat.path, out)
    assert first["computed_units"] == 3 and precisions() == ("fp32", dict.fromkeys(_unit_names(3), "fp32"))

    original = job.load_run

    def in_bf16(*args, **kwargs):  # the same checkpoint where it trains (and runs) in bf16
        model, cfg, path = original(*args, **kwargs)
        return model, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cpu_bf16=True)), path

    monkeypatch.setattr(job, "load_run", in_bf16)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="galcf_hpc"):
        again, bf16 = _catalog_run(ckpt, cat.path, out)
    assert again["computed_units"] == 3 and again["skipped_units"] == 0
    assert again["rejected_parts"] == [f"{n}.rejected-precision" for n in _unit_names(3)]
    assert "was computed in fp32, this catalog computes in bf16" in caplog.text
    assert precisions() == ("bf16", dict.fromkeys(_unit_names(3), "bf16"))
    assert verify_catalog(out)["num_galaxies"] == 6
    # really computed again in bf16: the latents differ from the fp32 ones, slightly
    diff = np.abs(bf16["h"] - fp32["h"]).max()
    assert 0 < diff < 0.5 * np.abs(fp32["h"]).max()
    # rendered where the model runs in fp32, the images of a bf16 catalog are not its bytes: said so
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="galcf_hpc"):
        render(out, index=0)
    assert "was computed in bf16, this render runs the model in fp32 on cpu" in caplog.text

    # a bf16 part planted among fp32 ones fails verify, naming the part and both precisions
    monkeypatch.setattr(job, "load_run", original)
    _catalog_run(ckpt, cat.path, out)
    shutil.copy(out / "parts" / "unit-000001.h5.rejected-precision-2", out / "parts" / "unit-000001.h5")  # the bf16 one
    with pytest.raises(DataError, match="unit-000001.h5.*was computed in bf16, this catalog computes in fp32"):
        verify_catalog(out)


def test_a_rank_at_another_precision_stops_the_job_before_computing(run_dir, make_catalog, tmp_path, monkeypatch):
    """Rank 0 plans every unit at its precision; a rank whose device would compute at another
    (a CPU without native bf16 beside one with it, a CPU rank in a GPU job) stops the job
    with both precisions named, before any part is written."""
    from galcf_hpc.catalog import job

    cat = make_catalog(n=4, size=32, seed=0)
    seen = iter(["bf16", "fp32"])  # rank 0's plan, then this rank's own device
    monkeypatch.setattr(job, "inference_precision", lambda _device, _train_cfg: next(seen))
    with pytest.raises(DataError, match="rank 0 would compute in fp32 on cpu, rank 0 planned every unit in bf16"):
        run_catalog(latest_checkpoint(run_dir), cat.path, tmp_path / "out", unit_size=2, targets="Merging")
    assert not list((tmp_path / "out" / "parts").glob("unit-*.h5"))


def _unit_names(n):
    return [f"unit-{u:06d}.h5" for u in range(n)]


def test_damaged_and_foreign_parts_are_moved_aside_and_recomputed(run_dir, make_catalog, tmp_path, caplog):
    """A part file counts as done only if it is a whole part of this very run; anything else
    under its name is renamed to unit-NNNNNN.h5.rejected-<reason> (never deleted), logged,
    and its unit computed again."""
    ckpt = latest_checkpoint(run_dir)
    cat = make_catalog(n=12, size=32, seed=0)
    out, parts = tmp_path / "out", tmp_path / "out" / "parts"
    first, before = _catalog_run(ckpt, cat.path, out)
    assert first["computed_units"] == 6
    # the same galaxies through another checkpoint file, and other galaxies (another input)
    _catalog_run(_other_checkpoint(ckpt, tmp_path), cat.path, tmp_path / "other_ckpt")
    other_input = make_catalog(name="other.h5", n=14, size=32, seed=3)
    _catalog_run(ckpt, other_input.path, tmp_path / "other_input")

    name = [f"unit-{u:06d}.h5" for u in range(6)]
    (parts / name[0]).write_bytes((parts / name[0]).read_bytes()[:2000])  # truncated
    (parts / name[1]).write_bytes(b"")  # zero bytes
    shutil.copy(tmp_path / "other_ckpt" / "parts" / name[2], parts / name[2])
    shutil.copy(tmp_path / "other_input" / "parts" / name[3], parts / name[3])
    with h5py.File(parts / name[4], "a") as f:  # what an older galcf-hpc wrote: no input_sha256
        f.attrs.pop("input_sha256", None)
    moved = {u: hashlib.sha256((parts / name[u]).read_bytes()).hexdigest() for u in range(5)}
    kept = (parts / name[5]).stat()

    with caplog.at_level(logging.WARNING, logger="galcf_hpc"):
        again, after = _catalog_run(ckpt, cat.path, out)
    reasons = ["unreadable", "unreadable", "checkpoint", "input", "unrecorded"]
    aside = [f"{name[u]}.rejected-{reason}" for u, reason in enumerate(reasons)]
    assert (again["skipped_units"], again["computed_units"]) == (1, 5) and again["rejected_parts"] == aside
    for u in range(5):  # moved aside untouched, named in the log with the reason
        assert hashlib.sha256((parts / aside[u]).read_bytes()).hexdigest() == moved[u]
        assert f"{parts / name[u]} " in caplog.text and f"moved aside to {aside[u]}" in caplog.text
    assert "a part of another catalog" in caplog.text and "lacks the attribute(s) input_sha256" in caplog.text
    assert "from input 'h5:14x32px:" in caplog.text
    st = (parts / name[5]).stat()
    assert (st.st_ino, st.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # the whole part stays
    for key in before:
        assert np.array_equal(after[key], before[key], equal_nan=after[key].dtype.kind == "f"), key
    notes = verify_catalog(out)["notes"]
    assert any("5 file(s) moved aside by `catalog run`" in n for n in notes)

    # damaged again: moved aside next to the first one, under a new name
    (parts / name[0]).write_bytes(b"")
    third, _ = _catalog_run(ckpt, cat.path, out)
    assert third["rejected_parts"] == [f"{name[0]}.rejected-unreadable-2"] and third["computed_units"] == 1
    assert (parts / aside[0]).is_file()


def test_verify_names_every_bad_part_and_never_crashes(run_dir, make_catalog, tmp_path, monkeypatch, capsys):
    ckpt = latest_checkpoint(run_dir)
    cat = make_catalog(n=12, size=32, seed=0)
    out, parts = tmp_path / "out", tmp_path / "out" / "parts"
    _catalog_run(ckpt, cat.path, out)
    # an input that looks the same from outside (same count, image size and byte size: the
    # same input fingerprint) but holds other galaxies
    look_alike = make_catalog(name="look_alike.h5", n=12, size=32, seed=5)
    _catalog_run(ckpt, look_alike.path, tmp_path / "look_alike")
    run = json.loads((out / "run.json").read_text())
    assert (
        json.loads((tmp_path / "look_alike" / "run.json").read_text())["input_fingerprint"] == run["input_fingerprint"]
    )

    (parts / "unit-000001.h5").write_bytes((parts / "unit-000001.h5").read_bytes()[:3000])
    shutil.copy(tmp_path / "look_alike" / "parts" / "unit-000002.h5", parts / "unit-000002.h5")
    with h5py.File(parts / "unit-000003.h5", "a") as f:
        f.attrs["checkpoint_sha256"] = "0" * 64
    (parts / "unit-000005.h5").unlink()
    code, err = run_cli(monkeypatch, capsys, "catalog", "verify", out)
    assert code == DataError.exit_code and "Traceback" not in err
    assert f"{parts / 'unit-000001.h5'} (galaxies 2-3) cannot be read as a part file" in err
    assert f"{parts / 'unit-000002.h5'} (galaxies 4-5) was computed from other galaxies" in err
    assert f"mv {parts / 'unit-000002.h5'} {parts / 'unit-000002.h5'}.rejected-input-rows" in err
    assert f"{parts / 'unit-000003.h5'} (galaxies 6-7) was computed with a checkpoint of sha256 {'0' * 64}" in err
    assert f"{parts / 'unit-000005.h5'} (galaxies 10-11) is missing" in err
    assert "values were not read through" in err and "unit-000000" not in err and "unit-000004" not in err

    # `catalog run` checks attributes only: it moves the damaged and the foreign part aside,
    # and keeps the look-alike one, which verify goes on naming until it is moved aside
    again, _ = _catalog_run(ckpt, cat.path, out)
    assert again["rejected_parts"] == ["unit-000001.h5.rejected-unreadable", "unit-000003.h5.rejected-checkpoint"]
    assert again["computed_units"] == 3
    with pytest.raises(DataError, match=r"unit-000002.h5 \(galaxies 4-5\) was computed from other galaxies"):
        verify_catalog(out)
    os.replace(parts / "unit-000002.h5", parts / "unit-000002.h5.rejected-input-rows")
    assert _catalog_run(ckpt, cat.path, out)[0]["computed_units"] == 1
    assert verify_catalog(out)["num_galaxies"] == 12

    # catalog.h5 without an attribute, or damaged: a DataError naming the file and attribute
    shutil.copy(out / "catalog.h5", tmp_path / "good.h5")
    with h5py.File(out / "catalog.h5", "a") as f:
        del f.attrs["unit_size"]
    code, err = run_cli(monkeypatch, capsys, "catalog", "verify", out)
    assert (
        code == DataError.exit_code
        and f"{out / 'catalog.h5'}: attribute 'unit_size' is missing" in err
        and "rerun" in err
    )
    (out / "catalog.h5").write_bytes((tmp_path / "good.h5").read_bytes()[:1500])
    code, err = run_cli(monkeypatch, capsys, "catalog", "verify", out)
    assert code == DataError.exit_code and f"{out / 'catalog.h5'} cannot be opened as HDF5" in err


def test_readers_never_read_another_catalogs_parts(mpi_catalog, tmp_path, monkeypatch, capsys):
    """HDF5 looks for a missing part of a virtual dataset last in the current directory: run
    from inside another catalog's directory, a reader of a catalog with a part missing reads
    that catalog's rows. verify, pack and the report's catalog summary refuse instead."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(mpi_catalog[0], a)
    shutil.copytree(mpi_catalog[0], b)
    with h5py.File(b / "parts" / "unit-000002.h5", "a") as f:  # b's rows 8-11 differ from a's
        f["ra"][:] = 1000.0
    (a / "parts" / "unit-000002.h5").unlink()
    monkeypatch.chdir(b)
    with h5py.File(a / "catalog.h5", "r") as f:  # the wrong read, as plain h5py does it
        assert (f["ra"][8:12] == 1000.0).all()

    with pytest.raises(DataError, match=r"not packed: .*unit-000002.h5 is missing"):
        pack_catalog(a / "catalog.h5", tmp_path / "packed.h5")
    assert not (tmp_path / "packed.h5").exists()
    code, err = run_cli(monkeypatch, capsys, "catalog", "pack", a, "--out", tmp_path / "packed.h5")
    assert (
        code == DataError.exit_code
        and "unit-000002.h5 (galaxies 8-11) is missing" in err
        and not (tmp_path / "packed.h5").exists()
    )
    with pytest.raises(DataError, match=r"(?s)unit-000002.h5 \(galaxies 8-11\) is missing.*values were not read"):
        verify_catalog(a)
    with pytest.raises(DataError, match=r"unit-000002.h5 is missing"):
        catalog_summary(a)

    # $HDF5_VDS_PREFIX comes before the catalog's own folder: with every part of a in place,
    # HDF5 would still read b's rows
    shutil.copy(mpi_catalog[0] / "parts" / "unit-000002.h5", a / "parts" / "unit-000002.h5")
    monkeypatch.setenv("HDF5_VDS_PREFIX", str(b))
    with h5py.File(a / "catalog.h5", "r") as f:
        assert (f["ra"][8:12] == 1000.0).all()
    for read in (verify_catalog, catalog_summary, lambda d: pack_catalog(d / "catalog.h5", tmp_path / "p.h5")):
        with pytest.raises(DataError, match="HDF5_VDS_PREFIX is set"):
            read(a)
    monkeypatch.delenv("HDF5_VDS_PREFIX")
    assert verify_catalog(a)["num_galaxies"] == 24 and catalog_summary(a)["num_galaxies"] == 24


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
    assert (
        code == DataError.exit_code and "is missing" in err and not (tmp_path / "holey" / "catalog_packed.h5").exists()
    )


def test_bad_inputs_fail_cleanly(run_dir, make_catalog, mpi_catalog, tmp_path, monkeypatch, capsys):
    ckpt = latest_checkpoint(run_dir)
    cat = make_catalog(n=8, size=32)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(cat.path.read_bytes()[:3000])
    code, err = run_cli(
        monkeypatch, capsys, "catalog", "run", "--checkpoint", ckpt, "--input", truncated, "--out", tmp_path / "o1"
    )
    assert code == DataError.exit_code and str(truncated) in err and "truncated" in err
    assert not (tmp_path / "o1").exists()
    # under MPI: rank 0 finds the problem, every rank stops with exit code 2, one message
    res = galcf("catalog", "run", "--checkpoint", ckpt, "--input", truncated, "--out", tmp_path / "o1", ranks=2)
    assert res.returncode == DataError.exit_code and res.stderr.count(f"galcf-hpc: error: {truncated}") == 1
    assert not (tmp_path / "o1").exists()
    code, err = run_cli(
        monkeypatch,
        capsys,
        "catalog",
        "run",
        "--checkpoint",
        ckpt,
        "--input",
        cat.path,
        "--out",
        tmp_path / "o1",
        "--targets",
        "Merging,Spiral",
    )
    assert code == UsageError.exit_code and "unknown class 'Spiral'" in err and not (tmp_path / "o1").exists()

    state = load_checkpoint(ckpt)
    state["config"]["model"]["z_dim"] = 16  # weights no longer fit the config
    torch.save(state, tmp_path / "mismatch.pt")
    code, err = run_cli(
        monkeypatch,
        capsys,
        "catalog",
        "run",
        "--checkpoint",
        tmp_path / "mismatch.pt",
        "--input",
        cat.path,
        "--out",
        tmp_path / "o2",
    )
    assert code == CheckpointError.exit_code and "another model configuration" in err and "mismatch.pt" in err
    assert not (tmp_path / "o2").exists()

    # an output directory of another run (another checkpoint file): refused, nothing changes
    out = tmp_path / "out"
    shutil.copytree(mpi_catalog[0], out)
    before = tree_digest(out)
    other = load_checkpoint(ckpt)
    other["step"] += 1
    torch.save(other, tmp_path / "other.pt")
    test_split = json.loads((out / "run.json").read_text())["input"]
    code, err = run_cli(
        monkeypatch,
        capsys,
        "catalog",
        "run",
        "--checkpoint",
        tmp_path / "other.pt",
        "--input",
        test_split,
        "--out",
        out,
        "--unit-size",
        4,
    )
    assert code == DataError.exit_code and "another catalog run" in err and "checkpoint_sha256" in err
    assert tree_digest(out) == before
    # the same checkpoint with other judges next to it (one of the two): refused the same way
    other_run = tmp_path / "other_run"
    (other_run / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, other_run / "checkpoints" / ckpt.name)
    shutil.copytree(run_dir / "judges" / "cnn", other_run / "judges" / "cnn")
    code, err = run_cli(
        monkeypatch,
        capsys,
        "catalog",
        "run",
        "--checkpoint",
        other_run / "checkpoints" / ckpt.name,
        "--input",
        test_split,
        "--out",
        out,
        "--unit-size",
        4,
    )
    assert (
        code == DataError.exit_code
        and "another catalog run" in err
        and "judges:" in err
        and "checkpoint_sha256" not in err
    )
    assert tree_digest(out) == before


def test_tasks_without_a_shared_mpi_world_are_refused(tmp_path):
    """srun with an MPI plug-in that does not match mpi4py: every task would see a world of
    one and explain the whole catalog; the job refuses before touching anything."""
    env = dict(os.environ, SLURM_STEP_NUM_TASKS="4")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "galcf_hpc.cli",
            "catalog",
            "run",
            "--checkpoint",
            str(tmp_path),
            "--input",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # only guards against a hang: on 2 shared cores importing torch alone can take long
    )
    assert (
        res.returncode == LaunchError.exit_code and "started 4 tasks but each sees an MPI world of size 1" in res.stderr
    )
    assert not (tmp_path / "out").exists()


def test_progress_counts_a_unit_when_its_rank_asks_for_the_next():
    from galcf_hpc.catalog.job import _Queue

    calls = []
    queue = _Queue([0, 1, 2], {0: 4, 1: 4, 2: 2}, calls.append)
    assert (queue.next(0), queue.next(1), calls) == (0, 1, [])
    assert queue.next(0) == 2 and calls == [4]  # rank 0 finished unit 0
    assert queue.next(1) is None and calls == [4, 8]
    assert queue.next(0) is None and calls == [4, 8, 10]  # every galaxy counted once


def test_disk_full_while_writing_a_part_keeps_the_finished_parts(mpi_catalog, run_dir, sharded, tmp_path):
    """A real write failure (a file-size limit: what a full disk or quota does to a write)
    while a part is written: the data-error exit code and a message naming the part, every
    part finished before unchanged, no temporary file left; the rerun resumes and verifies."""
    out = tmp_path / "out"
    shutil.copytree(mpi_catalog[0], out)
    parts = sorted((out / "parts").glob("unit-*.h5"))
    for late in parts[3:]:
        late.unlink()
    (out / "catalog.h5").unlink()
    kept = tree_digest(out / "parts")
    limit_kib = min(p.stat().st_size for p in parts[:3]) // 1024 // 2
    assert limit_kib >= 4, "parts too small for a file-size limit below them"
    args = ["catalog", "run", "--checkpoint", run_dir, "--input", sharded.out / "test", "--out", out, "--unit-size", 4]
    # the limit is set once MPI is up (MPI's start-up maps files of its own): the disk fills
    # while the job runs
    code = (
        "import resource, sys; from mpi4py import MPI; from galcf_hpc import cli; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_kib * 1024}, resource.RLIM_INFINITY)); "
        f"sys.exit(cli.main({[str(a) for a in args]!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == DataError.exit_code, done.stderr[-3000:]
    assert "writing catalog part" in done.stderr and "unit-000003.h5" in done.stderr, done.stderr[-3000:]
    assert "File too large" in done.stderr and "Traceback" not in done.stderr
    assert tree_digest(out / "parts") == kept and not list(out.rglob("*.tmp"))
    res = galcf(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 finished before (skipped), 3 computed" in res.stdout
    assert galcf("catalog", "verify", out).returncode == 0


def test_verify_and_pack_report_progress(mpi_catalog, tmp_path):
    from galcf_hpc.catalog.store import pack_catalog

    calls = []
    verify_catalog(mpi_catalog[0], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(d, 6) for d in range(1, 7)]  # one per part, the last when all six are checked
    copied = []
    n = pack_catalog(mpi_catalog[0] / "catalog.h5", tmp_path / "p.h5", progress=lambda d, t, name: copied.append(d))
    assert n == 24 and copied == sorted(copied) and copied[-1] == 24 * len(read_all(tmp_path / "p.h5")[0])


def test_without_thread_multiple_rank_0_only_hands_out_units(run_dir, sharded, mpi_catalog, tmp_path):
    """An MPI that gives less than MPI_THREAD_MULTIPLE (forced through mpi4py's
    MPI4PY_RC_THREAD_LEVEL): no thread next to the main one calls MPI; rank 0 serves, rank 1
    computes every unit, and the catalog is the same as the threaded run's."""
    out = tmp_path / "out"
    env = {**os.environ, "MPI4PY_RC_THREAD_LEVEL": "serialized"}
    res = subprocess.run(
        ["mpiexec", "-n", "2", *CLI, "catalog", "run", "--checkpoint", str(run_dir), "--input",
         str(sharded.out / "test"), "--out", str(out), "--unit-size", "4"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "thread level serialized, not MPI_THREAD_MULTIPLE" in res.stderr
    per_rank = json.loads((out / "summary.json").read_text())["per_rank"]
    assert [r["units"] for r in per_rank] == [0, 6]
    threaded, _ = read_all(mpi_catalog[0] / "catalog.h5")
    serial, _ = read_all(out / "catalog.h5")
    assert serial.keys() == threaded.keys()
    for name in ("key", "pred", "label", "validity", "validity_cnn", "validity_resnet_grey"):
        np.testing.assert_array_equal(serial[name], threaded[name])
    for name in ("h", "z", "ssim", "luminance_share"):  # another rank's threads: float rounding
        np.testing.assert_allclose(serial[name], threaded[name], atol=1e-4, rtol=1e-4, equal_nan=True)


# -- catalog export: Parquet, FITS, CSV for TOPCAT, astropy and pandas -------------------------


def _export_reference(mpi_catalog, tmp_path):
    """A copy of the 2-rank catalog with galaxy 1 unlabelled (label -1, set in its part file),
    and what catalog.h5 holds: every field but the images, and the attributes."""
    from galcf_hpc.catalog.store import IMAGE_FIELDS

    out = tmp_path / "cat"
    shutil.copytree(mpi_catalog[0], out)
    with h5py.File(out / "parts" / "unit-000000.h5", "a") as f:
        f["label"][1] = -1
    data, attrs = read_all(out / "catalog.h5")
    fields = {k: v for k, v in data.items() if k not in IMAGE_FIELDS}
    assert "image" in data and data["label"][1] == -1 and (data["label"][2:] >= 0).all()
    # the schema this test relies on: scalars, per-class, per-target (model and judges), components
    assert {"key", "ra", "dec", "label", "pred", "prob", "distance", "h", "z", "validity", "validity_cnn"} <= set(
        fields
    )
    assert np.isnan(fields["msd"]).any()  # target == pred: NaN, which every format must keep
    return out, fields, attrs


def _class_names_of(values, class_names):
    return [class_names[v] if v >= 0 else None for v in values]


def _same(got, want, name):
    """Exact equality, NaN where NaN; int8 may come back wider (FITS has no signed bytes)."""
    got = np.asarray(got)
    if want.dtype.kind == "S":
        want = np.char.decode(want, "utf-8")
        got = np.char.decode(got, "utf-8") if got.dtype.kind == "S" else got.astype(str)
    elif want.dtype.kind == "f":
        assert got.dtype.itemsize >= want.dtype.itemsize, name
        got = got.astype(want.dtype)  # exact for a float32 written as float32 or its shortest decimal
    else:
        assert got.dtype.kind == want.dtype.kind and np.array_equal(got.astype(want.dtype), got), name
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f"), name


def _expected_columns(fields, attrs):
    """Table columns in schema order, with a class-name column after label and pred."""
    names = []
    for name in attrs["fields"]:
        if name in fields:
            names += [name, f"{name}_name"] if name in ("label", "pred") else [name]
    return names


def test_export_parquet_fits_csv_hold_every_row_and_field(mpi_catalog, tmp_path, monkeypatch, capsys):
    import pandas as pd
    import pyarrow.parquet as pq
    from astropy import units as u
    from astropy.io import fits
    from astropy.table import Table

    from galcf_hpc.catalog.export import FORMATS
    from galcf_hpc.catalog.store import field_axis

    assert FORMATS == _export_format_choices()
    out, fields, attrs = _export_reference(mpi_catalog, tmp_path)
    n, keys = 24, np.char.decode(fields["key"], "utf-8").tolist()
    class_names, target_names = list(attrs["class_names"]), list(attrs["target_names"])
    sha = attrs["checkpoint_sha256"]
    columns = _expected_columns(fields, attrs)
    label_names = _class_names_of(fields["label"], class_names)
    pred_names = _class_names_of(fields["pred"], class_names)
    assert label_names[1] is None and None not in pred_names

    for fmt in FORMATS:
        code, err = run_cli(monkeypatch, capsys, "catalog", "export", out, "--format", fmt)
        assert code == 0, err
        assert (out / f"catalog.{fmt}").is_file()  # the default output name
    assert not list(out.glob(".*.tmp"))

    # Parquet through pyarrow: schema, units, element names, provenance
    table = pq.read_table(out / "catalog.parquet")
    schema = table.schema
    assert table.num_rows == n and table.column_names == columns
    assert table.column("key").to_pylist() == keys
    for name in ("ra", "dec"):
        assert schema.field(name).metadata[b"unit"] == b"deg"
    with h5py.File(out / "catalog.h5", "r") as f:
        descriptions = {name: f[name].attrs["description"] for name in fields}
    for name, values in fields.items():
        meta = schema.field(name).metadata
        assert meta[b"description"].decode().startswith(descriptions[name]), name
        axis = field_axis(name)
        if values.ndim == 2 and axis in ("class", "target"):
            want = class_names if axis == "class" else target_names
            assert json.loads(meta[b"elements"]) == want, name
            assert schema.field(name).type.list_size == len(want), name
        _same(np.array(table.column(name).to_pylist()), values, name)
    assert table.column("label_name").to_pylist() == label_names
    assert table.column("pred_name").to_pylist() == pred_names
    md = schema.metadata
    assert md[b"checkpoint_sha256"].decode() == sha and json.loads(md[b"class_names"]) == class_names
    assert json.loads(md[b"target_names"]) == target_names and md[b"config"].decode() == attrs["config"]
    assert md[b"input_fingerprint"].decode() == attrs["input_fingerprint"]
    # ... and through pandas
    df = pd.read_parquet(out / "catalog.parquet")
    assert list(df.columns) == columns and df["key"].tolist() == keys
    for name, values in fields.items():
        _same(np.stack(df[name].to_numpy()) if values.ndim == 2 else df[name].to_numpy(), values, name)
    assert df["label_name"].isna().tolist() == [v is None for v in label_names]
    assert df["pred_name"].tolist() == pred_names

    # FITS through astropy: one BINTABLE, vector columns, units, descriptions, provenance
    t = Table.read(out / "catalog.fits", mask_invalid=False)
    assert len(t) == n and t.colnames == columns
    assert t["ra"].unit == u.deg and t["dec"].unit == u.deg and t["label"].unit is None
    for name, values in fields.items():
        _same(t[name], values, name)
    assert [v or None for v in np.char.decode(np.asarray(t["label_name"]), "utf-8")] == label_names
    assert list(np.char.decode(np.asarray(t["pred_name"]), "utf-8")) == pred_names
    assert t.meta["CHECKPOINT_SHA256"] == sha and json.loads(t.meta["CLASS_NAMES"]) == class_names
    assert json.loads(t.meta["TARGET_NAMES"]) == target_names
    assert all(f"class {i}: {c}" in t.meta["comments"] for i, c in enumerate(class_names))
    with fits.open(out / "catalog.fits") as hdus:
        hdus.verify("exception")
        h = hdus["CATALOG"].header
        tcomm = {h[f"TTYPE{i}"]: h[f"TCOMM{i}"] for i in range(1, h["TFIELDS"] + 1)}
        assert h["TFORM" + str(columns.index("prob") + 1)] == f"{len(class_names)}E"
        assert h["TFORM" + str(columns.index("validity") + 1)] == f"{len(target_names)}I"
    assert set(tcomm) == set(columns)
    assert tcomm["prob"].endswith("class_names order: " + ", ".join(class_names))
    assert tcomm["msd"].endswith("target_names order: " + ", ".join(target_names))
    assert tcomm["ra"].startswith("right ascension")

    # CSV through pandas: one column per element, provenance in the sidecar, no comment lines
    text = (out / "catalog.csv").read_text()
    assert not text.startswith("#") and text.count("\n") == n + 1
    csv = pd.read_csv(out / "catalog.csv")
    side = json.loads((out / "catalog.csv.json").read_text())
    assert len(csv) == n and csv["key"].tolist() == keys
    assert side["provenance"]["checkpoint_sha256"] == sha and side["provenance"]["class_names"] == class_names
    assert side["config"] == attrs["config"] and [c["name"] for c in side["columns"]] == list(csv.columns)
    assert {c["name"]: c["unit"] for c in side["columns"]}["ra"] == "deg"
    assert {"prob_in_between_round_smooth", "validity_cnn_edge_on_with_bulge", "h_0", "z_0"} <= set(csv.columns)

    def safe(label):
        return "".join(c if c.isalnum() else " " for c in label).strip().replace(" ", "_").lower()

    flat = []
    for name in columns:
        values = fields.get(name)
        if values is None or values.ndim == 1:
            flat.append(name)
            if values is not None:
                _same(csv[name].to_numpy(), values, name)
            continue
        axis = field_axis(name)
        suffixes = {"class": [safe(c) for c in class_names], "target": [safe(c) for c in target_names]}.get(
            axis, [str(i) for i in range(values.shape[1])]
        )
        names = [f"{name}_{s}" for s in suffixes]
        flat += names
        _same(csv[names].to_numpy(), values, name)
    assert list(csv.columns) == flat
    assert csv["label_name"].isna().tolist() == [v is None for v in label_names]
    assert csv["pred_name"].tolist() == pred_names


def _export_format_choices():
    """The --format choices of `catalog export` (cli.py spells them out so that --help does
    not import the export module)."""
    parser = cli.build_parser()
    catalog = next(a for a in parser._actions if a.dest == "command").choices["catalog"]
    export = next(a for a in catalog._actions if a.dest == "catalog_cmd").choices["export"]
    return tuple(next(a for a in export._actions if a.dest == "format").choices)


def test_export_of_a_packed_file_streams_in_blocks(mpi_catalog, tmp_path):
    import pyarrow.parquet as pq

    from galcf_hpc.catalog.export import export_catalog

    out, fields, _ = _export_reference(mpi_catalog, tmp_path)
    packed = tmp_path / "packed.h5"
    pack_catalog(out / "catalog.h5", packed)
    shutil.rmtree(out)  # a packed file needs no parts
    calls = []
    s = export_catalog(packed, tmp_path / "t.parquet", "parquet", progress=lambda d, t: calls.append((d, t)), block=10)
    assert s["rows"] == 24 and calls == [(10, 24), (20, 24), (24, 24)]
    parquet = pq.ParquetFile(tmp_path / "t.parquet")
    assert parquet.metadata.num_row_groups == 3  # one row group per block
    table = parquet.read()
    for name, values in fields.items():
        _same(np.array(table.column(name).to_pylist()), values, name)

    # a failure half way (here: after the first block) leaves nothing under the final names
    class Stop(Exception):
        pass

    def fail(done, total):
        raise Stop

    for fmt in ("parquet", "fits", "csv"):
        target = tmp_path / f"half.{fmt}"
        with pytest.raises(Stop):
            export_catalog(packed, target, fmt, progress=fail, block=10)
        assert not target.exists() and not (tmp_path / f"half.{fmt}.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_refuses_a_damaged_catalog(mpi_catalog, tmp_path, monkeypatch, capsys):
    """A missing part (read from inside another catalog's directory, where plain h5py would
    return that catalog's rows), or a part of another catalog: refused with the data-error
    exit code, nothing written. Without pyarrow: a usage error naming the extra to install."""
    from galcf_hpc.catalog.export import export_catalog

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(mpi_catalog[0], a)
    shutil.copytree(mpi_catalog[0], b)
    (a / "parts" / "unit-000002.h5").unlink()
    before = sorted(os.listdir(a))
    monkeypatch.chdir(b)
    for fmt in ("parquet", "fits", "csv"):
        code, err = run_cli(monkeypatch, capsys, "catalog", "export", a, "--format", fmt)
        assert code == DataError.exit_code and "Traceback" not in err, err
        assert "unit-000002.h5 is missing" in err and f"galcf-hpc catalog verify {a}" in err, err
    assert sorted(os.listdir(a)) == before and not any(name.startswith("catalog.") for name in before[1:])

    shutil.copy(b / "parts" / "unit-000002.h5", a / "parts" / "unit-000002.h5")
    with h5py.File(a / "parts" / "unit-000003.h5", "a") as f:
        f.attrs["checkpoint_sha256"] = "0" * 64
    with pytest.raises(DataError, match=r"unit-000003.h5 \(galaxies 12-15\) was computed with a checkpoint"):
        export_catalog(a, tmp_path / "x.fits", "fits")
    assert not (tmp_path / "x.fits").exists()

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow fails
    code, err = run_cli(monkeypatch, capsys, "catalog", "export", b, "--format", "parquet")
    assert code == UsageError.exit_code and "pip install 'galcf-hpc[export]'" in err and "pyarrow" in err
    assert not (b / "catalog.parquet").exists()
