"""The astronomer's own cutouts as catalog input: a folder of PNG, JPEG or FITS files and a
CSV/Parquet list of files give the same catalog as the shards they were exported from (PNG
exactly, JPEG nearly), resume, and are checked by ``catalog verify``; FITS cubes decode to
the documented colour mapping; bad folders and lists fail with the file, row and column."""

import csv
import os
import re
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from galcf_hpc.catalog.job import run_catalog, verify_catalog
from galcf_hpc.catalog.source import FolderSource, H5Source, ListSource, ShardSource, open_source
from galcf_hpc.data.classes import CLASS_NAMES
from galcf_hpc.errors import DataError
from galcf_hpc.model.galcf import GalaxyCF
from test_train import tiny_config

UNIT = 8  # galaxies per work unit: the test split's 24 galaxies in 3 units


@pytest.fixture(scope="module")
def checkpoint(sharded, tmp_path_factory):
    """A randomly initialised tiny model saved as RUN/checkpoints/model.pt (no judges)."""
    run = tmp_path_factory.mktemp("cutout_model") / "run"
    cfg = tiny_config(sharded.out, run)
    torch.manual_seed(1)  # a seed whose model puts the 24 test galaxies into 5 classes, not 1 or 2
    path = run / "checkpoints" / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": GalaxyCF.from_config(cfg).state_dict(), "config": cfg.to_dict()}, path)
    return path


def write_list(path, header, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def exported(sharded, tmp_path_factory):
    """The test split exported as <key>.png and <key>.jpg (quality 95) files, and a CSV of
    the PNG files (paths relative to the list) in shard order with id, ra, dec and label
    (class names on even rows, numbers on odd ones)."""
    root = tmp_path_factory.mktemp("cutouts")
    source = ShardSource(sharded.out / "test")
    data = source.read(0, source.n)
    source.close()
    (root / "png").mkdir()
    (root / "jpg").mkdir()
    rows = []
    for i, key in enumerate(data["keys"]):
        image = Image.fromarray(data["images"][i])
        image.save(root / "png" / f"{key}.png")
        image.save(root / "jpg" / f"{key}.jpg", quality=95)
        label = int(data["labels"][i])
        rows.append(
            [
                f"png/{key}.png",
                key,
                repr(float(data["ra"][i])),
                repr(float(data["dec"][i])),
                CLASS_NAMES[label] if i % 2 == 0 else label,
            ]
        )
    write_list(root / "list.csv", ["path", "id", "ra", "dec", "label"], rows)
    return root, data


def read_catalog(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("key", "pred", "h", "label", "ra", "dec")}


@pytest.fixture(scope="module")
def catalogs(checkpoint, sharded, exported, tmp_path_factory):
    """The catalog of the same 24 galaxies from the shards, the PNG folder, the JPEG folder and
    the CSV list, each ordered as the shards (folders are in key order)."""
    root, data = exported
    out = tmp_path_factory.mktemp("cutout_catalogs")
    inputs = {"shards": sharded.out / "test", "png": root / "png", "jpg": root / "jpg", "csv": root / "list.csv"}
    result = {}
    for name, path in inputs.items():
        summary = run_catalog(checkpoint, path, out / name, unit_size=UNIT, device="cpu")
        assert summary["computed_units"] == 3
        cat = read_catalog(out / name / "catalog.h5")
        order = {k.decode(): i for i, k in enumerate(cat["key"])}
        result[name] = {k: v[[order[key] for key in data["keys"]]] for k, v in cat.items()}
    return out, inputs, result


def test_png_folder_and_csv_give_the_shards_catalog_exactly(catalogs, exported):
    _, data = exported
    _, _, cat = catalogs
    shards = cat["shards"]
    assert len(set(shards["pred"].tolist())) > 1  # a model that tells galaxies apart
    for name in ("png", "csv"):
        assert [k.decode() for k in cat[name]["key"]] == data["keys"]
        np.testing.assert_array_equal(cat[name]["pred"], shards["pred"])
        np.testing.assert_array_equal(cat[name]["h"], shards["h"])
    # the list brings labels and positions; a folder has none
    for field in ("label", "ra", "dec"):
        np.testing.assert_array_equal(cat["csv"][field], shards[field])
    assert (cat["png"]["label"] == -1).all() and np.isnan(cat["png"]["ra"]).all() and np.isnan(cat["png"]["dec"]).all()


def test_jpeg_folder_agrees_nearly(catalogs):
    """JPEG at quality 95 changes these noisy 32 px galaxies by 3.7 levels on average (23 at
    most). Measured here (torch 2.13 CPU, Pillow 13): pred agrees for 22 of 24 galaxies, h
    differs by 0.017 (median) and 0.090 (max) per component, where h spans -0.43 to 1.34 (std
    0.42). Bounds with a margin: 20 of 24, 0.03 and 0.15."""
    _, _, cat = catalogs
    agree = int((cat["jpg"]["pred"] == cat["shards"]["pred"]).sum())
    h_diff = np.abs(cat["jpg"]["h"] - cat["shards"]["h"])
    assert agree >= 20, agree
    assert np.median(h_diff) < 0.03 and h_diff.max() < 0.15, (np.median(h_diff), h_diff.max())


def test_rerun_resumes_and_verify_passes(catalogs, checkpoint):
    out, inputs, _ = catalogs
    for name in ("png", "csv"):
        again = run_catalog(checkpoint, inputs[name], out / name, unit_size=UNIT, device="cpu")
        assert again["computed_units"] == 0
        verify_catalog(out / name)


def test_replaced_file_fails_verify(checkpoint, exported, tmp_path):
    root, data = exported
    folder = tmp_path / "png"
    shutil.copytree(root / "png", folder)
    run_catalog(checkpoint, folder, tmp_path / "out", unit_size=UNIT, device="cpu")
    verify_catalog(tmp_path / "out")
    keys = sorted(data["keys"])
    victim = folder / f"{keys[10]}.png"  # row 10: unit 1, galaxies 8-15

    # changed in place, size and mtime kept (as a restore that keeps times would): the fingerprint
    # cannot see it, the part's sha256 of its rows does
    st = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[-20] ^= 0xFF
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match=r"unit-000001.h5 \(galaxies 8-15\) was computed from other galaxies") as err:
        verify_catalog(tmp_path / "out")
    assert "unit-000000" not in str(err.value) and "unit-000002" not in str(err.value)

    # replaced by another image (new size, new mtime): the input's fingerprint differs
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(victim)
    with pytest.raises(DataError, match=rf"input {folder} has changed since the catalog was made"):
        verify_catalog(tmp_path / "out")
    # and a rerun into the same --out refuses to resume
    with pytest.raises(DataError, match="holds the output of another catalog run .*input_fingerprint"):
        run_catalog(checkpoint, folder, tmp_path / "out", unit_size=UNIT, device="cpu")


def write_fits(path, data, bands=None):
    from astropy.io import fits

    header = fits.Header()
    for i, band in enumerate(bands or ()):
        header[f"BAND{i}"] = band
    fits.PrimaryHDU(np.asarray(data, np.float32), header=header).writeto(path)


def read_one(path):
    folder = path.parent
    return FolderSource(folder).read(0, 1)["images"][0]


@pytest.mark.parametrize("name", ["cube.fits", "cube.fits.gz", "cube.fit"])
def test_fits_cube_decodes_to_the_legacy_survey_mapping(tmp_path, name):
    """Hand-computed pixels of the documented mapping (docs/catalog.md, "Your own cutouts").

    A, g r z = 0.1 0.2 0.3 nanomaggies: v = 6*0.1+0.03, 3.4*0.2+0.03, 2.2*0.3+0.03 = 0.63 0.71
    0.69; I = 0.676667; asinh(20 I)/sqrt(20) = 0.737828; c = v * 0.737828/I = 0.68694 0.77417
    0.75237 -> R (z) 191.85 -> 192, G (r) 197.41 -> 197, B (g) 175.17 -> 175.
    B, g r z = -0.05 0.02 0.01: v = -0.27 0.098 0.052; I = (0 + 0.098 + 0.052)/3 = 0.05;
    asinh(1)/sqrt(20) = 0.197081; c = v * 3.941623 -> R 52.27 -> 52, G 98.50 -> 99, B < 0 -> 0.
    Empty (or NaN): v = 0.03 in every band, I = 0.03, c = asinh(0.6)/sqrt(20) = 0.127193 -> 32.
    """
    cube = np.zeros((3, 5, 5), np.float32)
    cube[:, 0, 0] = [0.1, 0.2, 0.3]  # FITS row 0: the bottom row of the picture
    cube[:, 4, 4] = [-0.05, 0.02, 0.01]  # the last FITS row: the top row
    cube[0, 2, 2] = np.nan  # masked in g: no flux
    write_fits(tmp_path / name, cube, bands=("g", "r", "z"))
    image = read_one(tmp_path / name)
    assert image.shape == (5, 5, 3)
    assert tuple(image[4, 0]) == (192, 197, 175)
    assert tuple(image[0, 4]) == (52, 99, 0)
    assert tuple(image[2, 2]) == tuple(image[1, 1]) == (32, 32, 32)
    # the same cube with its bands in another order, named by BAND0-BAND2: the same picture
    (tmp_path / name).unlink()
    write_fits(tmp_path / name, cube[::-1], bands=("z", "r", "g"))
    np.testing.assert_array_equal(read_one(tmp_path / name), image)


def test_fits_single_band_is_grey(tmp_path):
    # 0.5 nanomaggies, no band named: r's scale, v = 3.4*0.5+0.03 = 1.73, asinh(34.6)/sqrt(20) = 0.94747 -> 242
    image = np.zeros((4, 4), np.float32)
    image[3, 1] = 0.5
    write_fits(tmp_path / "a.fits", image)
    assert tuple(read_one(tmp_path / "a.fits")[0, 1]) == (242, 242, 242)
    # named g: v = 6*0.05+0.03 = 0.33, asinh(6.6)/sqrt(20) = 0.578227 -> 147.45 -> 147
    image[3, 1] = 0.05
    (tmp_path / "a.fits").unlink()
    write_fits(tmp_path / "a.fits", image[None], bands=("g",))
    assert tuple(read_one(tmp_path / "a.fits")[0, 1]) == (147, 147, 147)


def test_fits_other_bands_are_refused(tmp_path):
    write_fits(tmp_path / "a.fits", np.zeros((3, 4, 4)), bands=("g", "r", "i"))
    with pytest.raises(DataError, match=r"a.fits: cannot be decoded as FITS \(a cube of bands g, r, i"):
        read_one(tmp_path / "a.fits")


def test_folder_order_keys_and_conversions(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(rgb).save(tmp_path / "a.png")  # the first file: every image is 20 x 20
    Image.fromarray(rgb[..., 0]).save(tmp_path / "b" / "grey.PNG")
    rgba = np.dstack([rgb, rng.integers(0, 256, (20, 20), dtype=np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "b" / "alpha.png")
    big = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "m.png")
    Image.fromarray(rgb).save(tmp_path / ".hidden" / "x.png")
    Image.fromarray(rgb).save(tmp_path / ".skipped.png")
    (tmp_path / "notes.txt").write_text("not a cutout")

    source = open_source(tmp_path)
    assert isinstance(source, FolderSource)
    # sorted by the parts of the relative path ("a.png" < "b" < "m.png"), hidden names and other files skipped
    assert source.keys == ["a", "b/alpha", "b/grey", "m"]
    assert source.fingerprint.startswith("folder:4:")
    data = source.read(0, 4)
    assert data["images"].shape == (4, 20, 20, 3) and (data["labels"] == -1).all() and np.isnan(data["ra"]).all()
    np.testing.assert_array_equal(data["images"][0], rgb)
    np.testing.assert_array_equal(data["images"][2], np.repeat(rgb[..., :1], 3, axis=2))
    composited = np.rint(rgb.astype(float) * rgba[..., 3:] / 255).astype(np.uint8)
    np.testing.assert_array_equal(data["images"][1], composited)
    # 50 rows x 40 columns: centre 40 x 40 square (rows 5-44), Lanczos-resized to 20 x 20
    expected = np.asarray(Image.fromarray(big[5:45]).resize((20, 20), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(data["images"][3], expected)


def test_folder_with_two_files_of_one_key_is_refused(tmp_path):
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    image.save(tmp_path / "g1.png")
    image.save(tmp_path / "g1.jpg")
    with pytest.raises(DataError, match=r"g1.jpg and .*g1.png both have key 'g1'"):
        open_source(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty: no cutout files .*\(1 other file\(s\)\)"):
        open_source(empty)


def test_undecodable_image_is_named(tmp_path, checkpoint):
    folder = tmp_path / "cutouts"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DataError, match=rf"{folder / 'b.jpg'}: cannot be decoded as an image .*new --out"):
        run_catalog(checkpoint, folder, tmp_path / "out", unit_size=UNIT, device="cpu")
    write_list(tmp_path / "l.csv", ["path"], [["cutouts/a.png"], ["cutouts/b.jpg"]])
    with pytest.raises(DataError, match=r"l.csv: row 2 \(line 3\), column 'path': .*b.jpg cannot be decoded"):
        open_source(tmp_path / "l.csv").read(0, 2)
    (tmp_path / "fits").mkdir()
    (tmp_path / "fits" / "c.fits").write_bytes(b"SIMPLE  = nonsense" + bytes(100))
    with pytest.raises(DataError, match=r"c.fits: cannot be decoded as FITS"):
        open_source(tmp_path / "fits").read(0, 1)


def test_list_keys_labels_and_positions(tmp_path, exported):
    root, data = exported
    source = open_source(root / "list.csv")
    assert isinstance(source, ListSource) and source.keys == data["keys"]
    np.testing.assert_array_equal(source.labels, data["labels"])
    # without an id the key is the path as written, without extension; empty values are unknown
    write_list(
        tmp_path / "l.csv",
        ["Path", "RA", "dec", "label", "notes"],
        [
            [str(root / "png" / f"{data['keys'][0]}.png"), "", "", "", "x"],
            [f"{root}/jpg/{data['keys'][1]}.jpg", "10.5", "-3", "3.0", "y"],
        ],
    )
    source = open_source(tmp_path / "l.csv")
    assert source.keys == [str(root / "png" / data["keys"][0]), f"{root}/jpg/{data['keys'][1]}"]
    assert list(source.labels) == [-1, 3] and np.isnan(source.ra[0]) and source.dec[1] == -3.0
    assert source.fingerprint.startswith("list:2:")


def test_parquet_list_is_the_csv_list(tmp_path, exported):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root, data = exported
    columns = {"path": [], "id": [], "ra": [], "dec": [], "label": []}
    for i, key in enumerate(data["keys"]):
        for name, value in zip(
            columns, (f"{root}/png/{key}.png", key, data["ra"][i], data["dec"][i], int(data["labels"][i]))
        ):
            columns[name].append(value)
    columns["label"][0] = None  # unknown
    pq.write_table(pa.table(columns), tmp_path / "list.parquet")
    parquet, csv_list = open_source(tmp_path / "list.parquet"), open_source(root / "list.csv")
    assert parquet.keys == csv_list.keys and list(parquet.labels[1:]) == list(csv_list.labels[1:])
    assert parquet.labels[0] == -1
    np.testing.assert_array_equal(parquet.ra, csv_list.ra)
    np.testing.assert_array_equal(parquet.read(0, 4)["images"], csv_list.read(0, 4)["images"])


def test_bad_lists_name_file_row_and_column(tmp_path, checkpoint):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    cases = [
        (["file", "id"], [["a.png", "x"]], r"header \(columns: file, id\) has no column 'path'"),
        (["path"], [], r"no rows"),
        (
            ["path", "id"],
            [["a.png", "x"], ["missing.png", "y"]],
            r"row 2 \(line 3\), column 'path': .*missing.png does not exist",
        ),
        (
            ["path", "id"],
            [["a.png", "x"], ["a.png", "x"]],
            r"row 2 \(line 3\), column 'id': key 'x' is also the key of row 1 \(line 2\)",
        ),
        (
            ["path"],
            [["a.png"], ["./a.png"], ["a.png"]],
            r"row 3 \(line 4\), column 'path': key 'a' is also the key of row 1 .*add an 'id'",
        ),
        (["path", "label"], [["a.png", "Spiral"]], r"row 1 \(line 2\), column 'label': 'Spiral' is not a class 0-9"),
        (["path", "label"], [["a.png", "10"]], r"column 'label': '10' is not a class"),
        (["path", "ra"], [["a.png", "-10"]], r"row 1 \(line 2\), column 'ra': '-10' is not a right ascension"),
        (["path", "dec"], [["a.png", "north"]], r"column 'dec': 'north' is not a declination"),
        (["path"], [["a.txt"]], r"column 'path': 'a.txt' is not a cutout file"),
        (["path", "id"], [["a.png", ""]], r"column 'id': is empty"),
    ]
    for header, rows, message in cases:
        path = write_list(tmp_path / "bad.csv", header, rows)
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}: .*{message}"):
            assert open_source(path).fingerprint  # a missing file: found by the fingerprint
    # in the job, rank 0 asks for the fingerprint before anything is written
    path = write_list(tmp_path / "bad.csv", ["path"], [["a.png"], ["gone.png"]])
    with pytest.raises(DataError, match=r"bad.csv: row 2 \(line 3\), column 'path': .*gone.png does not exist"):
        run_catalog(checkpoint, path, tmp_path / "out", unit_size=UNIT, device="cpu")
    assert not (tmp_path / "out").exists()


def test_open_source_dispatch(tmp_path, sharded, make_catalog):
    assert isinstance(open_source(sharded.out / "test"), ShardSource)
    assert isinstance(open_source(make_catalog().path), H5Source)
    (tmp_path / "cat.txt").write_text("x")
    with pytest.raises(DataError, match=r"cat.txt: not an input .*a folder of cutouts .*\.csv or \.parquet"):
        open_source(tmp_path / "cat.txt")
    with pytest.raises(DataError, match=r"input does not exist; pass a shard split directory"):
        open_source(tmp_path / "nothing")
