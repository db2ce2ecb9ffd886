"""Shared fixtures: small astroNN-format catalogs and a sharded directory made from one."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from galcf_hpc.data.classes import NUM_CLASSES


def make_images(labels, size, rng):
    """uint8 (N, size, size, 3) blobs whose shape depends on the class: an elliptical
    Gaussian whose axis ratio, orientation and width follow the label, with a random
    centre jitter, per-channel brightness and noise."""
    n = len(labels)
    labels = np.asarray(labels, dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    centre = (size - 1) / 2 + rng.uniform(-size / 16, size / 16, (n, 2))
    dy = yy[None] - centre[:, 0, None, None]
    dx = xx[None] - centre[:, 1, None, None]
    angle = np.radians(18.0 * labels + rng.uniform(-5, 5, n))[:, None, None]
    q = (1.0 - 0.08 * labels)[:, None, None]
    sigma = (size / 8 * (1 + 0.05 * labels))[:, None, None]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / q
    blob = np.exp(-(u**2 + v**2) / (2 * sigma**2))
    colour = rng.uniform(120, 230, (n, 1, 1, 3))
    images = blob[..., None] * colour + rng.normal(10, 5, (n, size, size, 3))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def write_astronn_h5(
    path,
    n=60,
    size=32,
    seed=0,
    duplicate_pairs=0,
    conflicting_pairs=0,
    triplets=0,
    float_images=False,
    keys=("images", "ans", "ra", "dec", "redshift", "pxscale"),
):
    """Write an astroNN Galaxy10-format file with plain h5py (independent of the package).

    Planted duplicates: ``duplicate_pairs`` galaxies re-observed 2-6" away with the same
    label, ``conflicting_pairs`` with a different label, ``triplets`` stored three times.
    Returns the arrays written and the planted groups (lists of indices).
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % NUM_CLASSES)
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-0.5, 0.9, n)))
    groups, conflicting = [], []
    free = iter(rng.permutation(n).tolist())
    for kind, count, copies in (
        ("same", duplicate_pairs, 2),
        ("conflict", conflicting_pairs, 2),
        ("same", triplets, 3),
    ):
        for _ in range(count):
            members = [next(free) for _ in range(copies)]
            first = members[0]
            for m in members[1:]:
                offset = rng.uniform(2, 6) / 3600
                ra[m] = (ra[first] + offset / np.cos(np.radians(dec[first]))) % 360
                dec[m] = dec[first]
                labels[m] = labels[first] if kind == "same" else (labels[first] + 1) % NUM_CLASSES
            groups.append(members)
            if kind == "conflict":
                conflicting.append(members)
    images = make_images(labels, size, rng)
    redshift = rng.uniform(0.01, 0.3, n)
    pxscale = np.where(rng.uniform(size=n) < 0.05, 0.524, 0.262)
    data = {
        "images": images.astype(np.float32) / 255 if float_images else images,
        "ans": labels.astype(np.uint8),
        "ra": ra,
        "dec": dec,
        "redshift": redshift,
        "pxscale": pxscale,
    }
    with h5py.File(path, "w") as f:
        for key in keys:
            f.create_dataset(key, data=data[key])
    return SimpleNamespace(
        path=path,
        images=images,
        labels=labels.astype(np.int64),
        ra=ra,
        dec=dec,
        redshift=redshift,
        pxscale=pxscale,
        groups=groups,
        conflicting=conflicting,
    )


@pytest.fixture
def make_catalog(tmp_path):
    """Factory: ``make_catalog(name="cat.h5", **kwargs)`` -> catalog namespace."""

    def make(name="cat.h5", **kwargs):
        return write_astronn_h5(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    """240 galaxies (32 px) with planted duplicates, sharded 50 per tar (train: 50+50+50+42).

    Session-scoped and read-only: tests that damage files work on ``sharded_copy``.
    """
    from galcf_hpc.data.shards import write_shards

    root = tmp_path_factory.mktemp("sharded")
    catalog = write_astronn_h5(
        root / "galaxies.h5", n=240, size=32, seed=1, duplicate_pairs=4, conflicting_pairs=2, triplets=1
    )
    out = root / "shards"
    summary = write_shards(catalog.path, out, shard_size=50, seed=0)
    return SimpleNamespace(catalog=catalog, out=out, summary=summary)


@pytest.fixture
def sharded_copy(sharded, tmp_path):
    """A private copy of the ``sharded`` directory that a test may damage."""
    out = tmp_path / "shards"
    shutil.copytree(sharded.out, out)
    return out


@pytest.fixture(scope="session")
def sharded_as(sharded, tmp_path_factory):
    """``sharded_as(fmt)``: the ``sharded`` catalog's shards (same split and order) with images
    as ``png`` (``sharded.out`` itself), ``jpg`` (quality 95) or ``jp2``; each written once per
    session when first asked for, read-only."""
    from galcf_hpc.data.shards import write_shards

    made = {"png": sharded.out}

    def get(fmt):
        if fmt not in made:
            out = tmp_path_factory.mktemp(f"sharded_{fmt}") / "shards"
            write_shards(sharded.catalog.path, out, shard_size=50, seed=0, image_format=fmt)
            made[fmt] = out
        return made[fmt]

    return get


@pytest.fixture
def sharded_copy_as(sharded_as, tmp_path):
    """``sharded_copy_as(fmt)``: a private copy of ``sharded_as(fmt)`` that a test may damage."""

    def copy(fmt):
        out = tmp_path / f"shards_{fmt}"
        shutil.copytree(sharded_as(fmt), out)
        return out

    return copy


@pytest.fixture
def patch_member():
    """``patch_member(tar_path, sample_no, ext, change)``: replace one member's data in place
    with ``change(old bytes)`` (same length); returns the sample's key."""
    from galcf_hpc.data.shards import read_index

    def patch(tar_path, sample_no, ext, change):
        sample = read_index(tar_path.with_suffix(".idx"))[sample_no]
        component = next(c for c in sample["components"] if c["ext"] == ext)
        start, stop = component["offset"], component["offset"] + component["size"]
        raw = bytearray(tar_path.read_bytes())
        new = change(bytes(raw[start:stop]))
        assert len(new) == stop - start
        raw[start:stop] = new
        tar_path.write_bytes(bytes(raw))
        return sample["key"]

    return patch


@pytest.fixture
def foreign_lock():
    """``hold(directory)``: a live process of this host holds ``directory/.lock`` (as
    ``DirLock`` writes it); returns that process (kill it to make the owner gone). Every
    holder is killed at teardown."""
    holders = []

    def hold(directory):
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        holders.append(holder)
        owner = {"host": os.uname().nodename, "pid": holder.pid, "slurm_job_id": None}
        (directory / ".lock").write_text(json.dumps(owner))
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()
