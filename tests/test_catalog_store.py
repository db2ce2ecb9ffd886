"""The catalog store at survey scale (store layer only, no model, a second or two): the unit
size rule, the hashed duplicate-key check, the value check in blocks of whole units (in this
process and in forked workers) still naming the first bad index, catalog.h5 assembled from
mappings written straight into the property list, and pack reading whole units."""

import h5py
import numpy as np
import pytest

from galcf_hpc.catalog import store

TARGETS = [0, 4, 7]


def tiny_fields():
    return store.schema(12, 10, 4, 6, len(TARGETS), 8, "uint8", judges=["cnn"], images="none")


def tiny_rows(fields, start, stop):
    rng = np.random.default_rng(start)
    n = stop - start
    pred = rng.integers(0, 10, n)
    own = pred[:, None] == np.asarray(TARGETS)[None]
    prob = rng.dirichlet(np.ones(10), n).astype(np.float32)

    def validity():
        return np.where(own, -1, rng.integers(0, 2, own.shape)).astype(np.int8)

    def per_target():
        return np.where(own, np.nan, rng.random(own.shape)).astype(np.float32)

    label = rng.integers(-1, 10, n)
    return {
        "key": np.array([f"dr8_{i}_{i % 7}" for i in range(start, stop)], "S12"),
        "ra": rng.uniform(0, 360, n),
        "dec": rng.uniform(-20, 80, n),
        "label": label.astype(np.int16),
        "pred": pred.astype(np.int16),
        "prob": prob,
        "margin": rng.random(n).astype(np.float32),
        "mislabel_score": np.where(label >= 0, rng.random(n), np.nan).astype(np.float32),
        "distance": rng.uniform(1, 9, (n, 10)).astype(np.float32),
        "h": rng.normal(size=(n, 4)).astype(np.float32),
        "z": rng.normal(size=(n, 6)).astype(np.float32),
        "validity": validity(),
        "validity_cnn": validity(),
        "msd": per_target(),
        "ssim": per_target(),
        "luminance_share": per_target(),
    }


RUN = {
    "checkpoint_sha256": "0" * 64,
    "judges": {"cnn": "1" * 64},
    "targets": TARGETS,
    "input_fingerprint": "test",
    "precision": "fp32",
}


def make_catalog(out, n=100, unit_size=16, plant=None):
    """Parts written with the job's own writer and catalog.h5 over them; ``plant(unit,
    arrays)`` may change a unit's values before they are written."""
    fields = tiny_fields()
    units = store.work_units(n, unit_size)
    (out / store.PARTS).mkdir(parents=True)
    for unit, (start, stop) in enumerate(units):
        arrays = tiny_rows(fields, start, stop)
        if plant:
            plant(unit, arrays)
        attrs = store.part_attrs(unit, start, stop, RUN, "a" * 64)
        with store.part_writer(out / store.PARTS / store.part_name(unit), stop - start, fields, attrs) as write:
            write(0, arrays)
    store.write_catalog_file(out, units, fields, {"unit_size": unit_size, "num_galaxies": n})
    return out / store.CATALOG, fields, units


def test_default_unit_size_balances_ranks_and_keeps_parts_few():
    size = store.default_unit_size
    assert size(8_670_000, 4) == 32768 and size(8_670_000, 2) == 32768  # 265 parts
    assert size(8_670_000, 64) == 16384 and size(8_670_000, 256) == 16384  # 530, not 2117 parts
    assert size(17_736, 4) == 512 and size(1774, 4) == 256 and size(10, 1) == 256 and size(0, 1) == 256
    for n in (1, 999, 70_000, 1_000_000, 8_670_000, 40_000_000):
        for ranks in (1, 2, 3, 4, 64, 1000):
            u = size(n, ranks)
            parts = len(store.work_units(n, u))
            assert u & (u - 1) == 0 and store.MIN_UNIT_SIZE <= u <= store.MAX_UNIT_SIZE
            assert parts <= store.MAX_PARTS or u == store.MAX_UNIT_SIZE
            # enough units for every rank, unless that would make too many parts
            assert (
                u == store.MIN_UNIT_SIZE
                or parts >= store.UNITS_PER_RANK * ranks
                or (len(store.work_units(n, u // 2)) > store.MAX_PARTS)
            )
    # full images (1.8 MB per galaxy at 256 px, 9 targets): a part built in memory stays small
    full = store.schema(24, 10, 64, 256, 9, 256, "uint8", ["cnn"], images="full")
    assert size(8_670_000, 4, fields=full) == 256
    assert size(8_670_000, 4, fields=store.schema(24, 10, 64, 256, 9, 512, "uint8", images="full")) == 64
    assert size(8_670_000, 4, fields=store.schema(24, 10, 64, 256, 9, 256, "uint8", images="none")) == 32768


@pytest.mark.parametrize("width", [8, 12, 24])
def test_duplicate_keys_found_exactly(width):
    keys = np.array([f"k{i:0{width - 1}d}"[-width:] for i in range(50_000)], f"S{width}")
    assert store.duplicate_keys(keys) == (0, None)
    assert store.duplicate_keys(keys[:1]) == (0, None) and store.duplicate_keys(keys[:0]) == (0, None)
    planted = keys.copy()
    planted[40_000] = planted[123]
    planted[7] = planted[8] = planted[9]
    count, example = store.duplicate_keys(planted)
    assert count == 2 and example in (bytes(keys[123]), bytes(keys[9]))
    # agrees with np.unique on random short keys, which collide often
    rng = np.random.default_rng(width)
    small = np.array([bytes(rng.integers(97, 100, 3)) for _ in range(2000)], "S3")
    unique, counts = np.unique(small, return_counts=True)
    assert store.duplicate_keys(small)[0] == (counts > 1).sum()


def test_row_blocks_end_on_unit_boundaries():
    units = store.work_units(1000, 48)
    blocks = store._row_blocks(units, 200)
    assert blocks[0][0] == 0 and blocks[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    bounds = {stop for _, stop in units}
    assert all(stop in bounds and stop - start >= 200 for start, stop, _ in blocks[:-1])
    assert sum(parts for _, _, parts in blocks) == len(units)
    assert store._row_blocks(units, 10**9) == [(0, 1000, len(units))]


def test_write_catalog_file_maps_every_unit(tmp_path):
    path, fields, units = make_catalog(tmp_path, n=100, unit_size=16)  # last unit: 4 galaxies
    with h5py.File(path, "r") as f:
        assert store.check_mapping(f, units, fields) == [] and store.check_sources(f, tmp_path) == []
        assert store.check_mapping(f, store.work_units(100, 32), fields)  # another layout is not this one
        assert f["z"].fillvalue != f["z"].fillvalue and f["pred"].fillvalue == -32768
        for start, stop in units:
            assert (f["key"][start:stop] == tiny_rows(fields, start, stop)["key"]).all()


@pytest.mark.parametrize("workers", [1, 2])
def test_check_values_clean_and_planted(tmp_path, workers):
    path, fields, units = make_catalog(tmp_path / "clean")
    problems, keys = store.check_values(path, fields, TARGETS, units, workers=workers, block=20)
    assert problems == [] and keys.tolist() == [f"dr8_{i}_{i % 7}".encode() for i in range(100)]

    def plant(unit, a):
        if unit == 2:  # rows 32-47
            a["pred"][3:5] = -32768  # fill value in rows 35 and 36
            a["validity"][3:5] = a["validity_cnn"][3:5] = 0  # (consistent with that pred)
            a["z"][9, 2] = np.nan  # row 41
        if unit == 5:  # rows 80-95
            a["key"][1] = b"dr8_7_0"  # row 81 repeats row 7's key
            a["pred"][6], a["validity"][6] = 1, 0  # row 86: no target is pred ...
            a["validity_cnn"][6] = [0, -1, 1]  # ... but the judge's validity says one is

    path, fields, units = make_catalog(tmp_path / "planted", plant=plant)
    problems, _ = store.check_values(path, fields, TARGETS, units, workers=workers, block=20)
    assert "'pred' holds its fill value -32768 for 2 galaxies, first index 35" in problems[0]
    assert "'z' holds its fill value nan for 1 galaxies, first index 41" in problems[1]
    assert "'validity_cnn' is -1 somewhere other than where target == pred (1 galaxies, first index 86)" in problems
    assert "1 keys appear more than once, e.g. b'dr8_7_0'" in problems
    # an open file is read in this process, and without units in fixed blocks: same answer
    with h5py.File(path, "r") as f:
        assert store.check_values(f, fields, TARGETS, block=7)[0] == problems


def test_pack_reads_whole_units_and_keeps_values(tmp_path):
    path, fields, units = make_catalog(tmp_path / "c", n=300, unit_size=64)
    calls = []
    n = store.pack_catalog(path, tmp_path / "packed.h5", block=40, progress=lambda d, t, name: calls.append(d))
    assert n == 300 and calls[-1] == 300 * len(fields)
    with h5py.File(path, "r") as c, h5py.File(tmp_path / "packed.h5", "r") as p:
        assert sorted(p) == sorted(c) and p.attrs["unit_size"] == 64
        for name in c:
            a, b = c[name][()], p[name][()]
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
            assert not p[name].is_virtual and p[name].compression == "gzip"
            assert dict(p[name].attrs) == dict(c[name].attrs)
        assert p["z"].shuffle and not p["validity"].shuffle and p["pred"].chunks == (32,)
        assert np.isnan(p["h"].fillvalue) and p["pred"].fillvalue == -32768


CHECK_UNDER_LIMIT = """
import resource, sys
import h5py, numpy as np
sys.path.insert(0, {tests!r})
from test_catalog_store import TARGETS, tiny_fields
from galcf_hpc.catalog import store
resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
path, fields = {path!r}, tiny_fields()
units = store.work_units({n}, {unit})
with h5py.File(path, "r") as f:  # a plain read of a whole column
    try:
        print("plain read fill values:", int((f["pred"][:] == -32768).sum()))
    except OSError as exc:
        print("plain read failed:", exc)
for workers in (1, 2):
    problems, keys = store.check_values(path, fields, TARGETS, units, workers=workers)
    assert problems == [] and len(keys) == {n} and store.duplicate_keys(keys) == (0, None), problems
store.pack_catalog(path, {packed!r})
with h5py.File({packed!r}, "r") as f:
    assert (f["pred"][:] >= 0).all() and (f["key"][:] != b"").all()
print("checked")
"""


def test_more_parts_than_open_files(tmp_path):
    """Past the open-file limit HDF5 reads the parts it cannot open as fill values (h5py 3.16,
    HDF5 2.0: no error); check_values and pack hold at most _OPEN_PARTS parts open at once,
    so they read every part (and find nothing wrong) with 300 parts under a limit of 200."""
    import subprocess
    import sys
    from pathlib import Path

    path, _, _ = make_catalog(tmp_path / "c", n=600, unit_size=2)
    script = CHECK_UNDER_LIMIT.format(
        tests=str(Path(__file__).parent), limit=200, path=str(path), n=600, unit=2, packed=str(tmp_path / "p.h5")
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "checked" in res.stdout, res.stdout + res.stderr
