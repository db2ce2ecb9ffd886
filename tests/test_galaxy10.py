"""astroNN Galaxy10 .h5 reader/writer: round trip and every kind of bad input."""

import hashlib

import h5py
import numpy as np
import pytest

from galcf_hpc.data.galaxy10 import open_catalog, write_catalog
from galcf_hpc.errors import DataError


def _columns(n, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return dict(
        images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        ans=rng.integers(0, 10, n),
        ra=rng.uniform(0, 360, n),
        dec=rng.uniform(-60, 60, n),
        redshift=rng.uniform(0, 0.3, n),
        pxscale=np.full(n, 0.262),
    )


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_read_round_trip(tmp_path):
    cols = _columns(30)
    path = tmp_path / "cat.h5"
    write_catalog(path, **cols, attrs={"origin": "test"})
    with open_catalog(path) as cat:
        assert (len(cat), cat.n, cat.image_size) == (30, 30, 16)
        assert cat.labels.dtype == np.int64 and np.array_equal(cat.labels, cols["ans"])
        for key in ("ra", "dec", "redshift", "pxscale"):
            assert getattr(cat, key).dtype == np.float64
            assert np.array_equal(getattr(cat, key), cols[key])
        order = np.array([7, 3, 29, 3, 0, 12])  # unsorted, with a repeat
        assert np.array_equal(cat.read_images(order), cols["images"][order])
        assert np.array_equal(cat.read_images(np.arange(30)), cols["images"])
        assert cat.attrs["origin"] == "test"
    with h5py.File(path) as f:  # the astroNN layout, one image per chunk
        assert f["images"].chunks == (1, 16, 16, 3)
        assert f["ans"].dtype == np.uint8


def test_reads_astronn_file_written_by_plain_h5py(make_catalog):
    cat_info = make_catalog(n=20, size=24)
    with open_catalog(cat_info.path) as cat:
        assert np.array_equal(cat.labels, cat_info.labels)
        assert np.array_equal(cat.read_images([19, 0]), cat_info.images[[19, 0]])


def test_missing_optional_keys(make_catalog):
    info = make_catalog(n=10, keys=("images", "ra", "dec"))
    with open_catalog(info.path) as cat:
        assert cat.labels is None
        assert np.isnan(cat.redshift).all() and np.isnan(cat.pxscale).all()


def test_float_images_in_unit_range_are_converted(make_catalog):
    info = make_catalog(n=8, float_images=True)
    with open_catalog(info.path) as cat:
        assert np.array_equal(cat.read_images(np.arange(8)), info.images)


def _rewrite(path, key, value):
    with h5py.File(path, "a") as f:
        del f[key]
        f.create_dataset(key, data=value)


def _bad_label(path):
    with h5py.File(path, "a") as f:
        ans = f["ans"][()]
        ans[7] = 12
        f["ans"][...] = ans


def _nan_ra(path):
    with h5py.File(path, "a") as f:
        ra = f["ra"][()]
        ra[3] = np.nan
        f["ra"][...] = ra


def _drop_images(path):
    with h5py.File(path, "a") as f:
        del f["images"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_AT_OPEN = {
    "truncated": (_truncate, ["truncated or not HDF5", "re-download or re-generate"]),
    "not_hdf5": (lambda p: p.write_text("ra,dec\n1,2\n"), ["not HDF5"]),
    "missing_images": (_drop_images, ["'images' is missing"]),
    "label_out_of_range": (_bad_label, ["'ans'", "sample 7", "12"]),
    "wrong_image_shape": (
        lambda p: _rewrite(p, "images", np.zeros((20, 16, 12, 3), np.uint8)),
        ["'images'", "(20, 16, 12, 3)"],
    ),
    "wrong_image_rank": (lambda p: _rewrite(p, "images", np.zeros((20, 16, 16), np.uint8)), ["'images'", "shape"]),
    "int16_images": (lambda p: _rewrite(p, "images", np.zeros((20, 16, 16, 3), np.int16)), ["'images'", "int16"]),
    "complex_images": (
        lambda p: _rewrite(p, "images", np.zeros((20, 16, 16, 3), np.complex64)),
        ["'images'", "complex"],
    ),
    "string_images": (lambda p: _rewrite(p, "images", np.full((20, 16, 16, 3), b"x")), ["'images'", "dtype"]),
    "labels_too_short": (lambda p: _rewrite(p, "ans", np.zeros(19, np.uint8)), ["'ans'", "20 images"]),
    "ra_too_long": (lambda p: _rewrite(p, "ra", np.zeros(21)), ["'ra'", "20 images"]),
    "nan_ra": (_nan_ra, ["'ra'", "sample 3"]),
}


@pytest.mark.parametrize("case", sorted(BAD_AT_OPEN))
def test_bad_file_raises_data_error_naming_file_and_key(make_catalog, case):
    damage, expected = BAD_AT_OPEN[case]
    info = make_catalog(name=f"{case}.h5", n=20, size=16)
    damage(info.path)
    with pytest.raises(DataError) as err:
        open_catalog(info.path)
    message = str(err.value)
    assert f"{case}.h5" in message
    for text in expected:
        assert text in message


def test_nan_pixels_in_float_images_name_the_sample(make_catalog):
    info = make_catalog(name="nan.h5", n=10, float_images=True)
    with h5py.File(info.path, "a") as f:
        images = f["images"][()]
        images[5, 2, 3, 1] = np.nan
        f["images"][...] = images
    with open_catalog(info.path) as cat:
        assert cat.read_images([1, 4]).shape == (2, 32, 32, 3)
        with pytest.raises(DataError, match=r"nan\.h5.*'images' sample 5 .*non-finite"):
            cat.read_images([9, 5])


def test_float_images_out_of_range_name_the_sample(make_catalog):
    info = make_catalog(name="range.h5", n=6, float_images=True)
    with h5py.File(info.path, "a") as f:
        images = f["images"][()]
        images[4] += 3.0  # no longer in [0, 1], the scale sample 0 set
        f["images"][...] = images
    with open_catalog(info.path) as cat, pytest.raises(DataError, match=r"range\.h5.*sample 4 .*outside \[0, 1\]"):
        cat.read_images(np.arange(6))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nowhere.h5.*does not exist"):
        open_catalog(tmp_path / "nowhere.h5")


def test_cut_data_chunks_raise_on_read_naming_the_samples(tmp_path):
    """Header intact (file zero-filled to its full length) but image chunks lost."""
    cols = _columns(40, size=32)
    path = tmp_path / "partial.h5"
    write_catalog(path, **cols)
    data = path.read_bytes()
    keep = int(len(data) * 0.6)
    path.write_bytes(data[:keep] + bytes(len(data) - keep))
    with open_catalog(path) as cat:
        assert np.array_equal(cat.read_images([0, 1]), cols["images"][:2])
        with pytest.raises(DataError) as err:
            cat.read_images(np.arange(40))
    message = str(err.value)
    assert "partial.h5" in message and "samples 0-39" in message and "truncated or corrupt" in message
    first_bad = int(message.split("first bad one is sample ")[1].split()[0])
    assert 2 <= first_bad < 40


@pytest.mark.parametrize(
    "bad",
    [
        {"images": np.zeros((5, 16, 16, 3), np.float32)},
        {"images": np.zeros((5, 16, 8, 3), np.uint8)},
        {"ans": np.array([0, 1, 2, 3, 10])},
        {"ra": np.zeros(4)},
        {"dec": np.array([0, 0, np.nan, 0, 0])},
    ],
)
def test_failing_write_leaves_existing_file_intact(tmp_path, bad):
    path = tmp_path / "cat.h5"
    write_catalog(path, **_columns(5))
    before = _sha(path)
    with pytest.raises(DataError, match="cat.h5"):
        write_catalog(path, **{**_columns(5, seed=1), **bad})
    assert _sha(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.h5"]


def test_write_interrupted_midway_leaves_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "cat.h5"
    write_catalog(path, **_columns(5))
    before = _sha(path)
    import galcf_hpc.data.galaxy10 as galaxy10

    monkeypatch.setattr(galaxy10, "_WRITE_BLOCK", 2)
    calls = []
    original = h5py.Dataset.__setitem__

    def fail_on_second_block(self, key, value):
        calls.append(key)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", fail_on_second_block)
    with pytest.raises(OSError, match="simulated"):
        write_catalog(path, **_columns(5, seed=1))
    monkeypatch.undo()
    assert _sha(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.h5"]
    with open_catalog(path) as cat:
        assert np.array_equal(cat.read_images(np.arange(5)), _columns(5)["images"])
