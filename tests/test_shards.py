"""Split, shard writing, DALI index files, manifests and verification."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import galcf_hpc.data.shards as shards
from galcf_hpc.data.classes import CLASS_NAMES, NUM_CLASSES
from galcf_hpc.data.shards import (
    SPLITS,
    group_by_sky,
    read_index,
    read_manifest,
    split_indices,
    verify_shards,
    write_shards,
)
from galcf_hpc.errors import DataError, UsageError


def _tars(out):
    return sorted(out.glob("*/shard-*.tar"))


def _source_index(key):
    return int(key[1:])


# --- grouping and splitting -------------------------------------------------------------


def _brute_force_groups(ra, dec, radius_arcsec):
    ra, dec = np.radians(ra), np.radians(dec)
    cos_sep = np.sin(dec)[:, None] * np.sin(dec)[None] + np.cos(dec)[:, None] * np.cos(dec)[None] * np.cos(
        ra[:, None] - ra[None]
    )
    linked = np.degrees(np.arccos(np.clip(cos_sep, -1, 1))) * 3600 <= radius_arcsec
    group = np.arange(len(ra))
    changed = True
    while changed:  # propagate the smallest index through links until stable
        new = np.where(linked, group[None], len(ra)).min(axis=1)
        changed = not np.array_equal(new, group)
        group = new
    return group


def test_group_by_sky_matches_brute_force_friends_of_friends():
    rng = np.random.default_rng(3)
    # Clustered field: 40 centres with 1-8 members scattered over ~15", plus RA wrap and pole.
    centres_ra, centres_dec = rng.uniform(0, 360, 40), rng.uniform(-60, 60, 40)
    ra, dec = [], []
    for cra, cdec in zip(centres_ra, centres_dec):
        k = rng.integers(1, 9)
        ra.extend(cra + rng.normal(0, 8, k) / 3600 / np.cos(np.radians(cdec)))
        dec.extend(cdec + rng.normal(0, 8, k) / 3600)
    ra += [359.9995, 0.0005, 0.0, 180.0]
    dec += [0.0, 0.0, 89.9999, 89.9999]
    ra, dec = np.mod(ra, 360), np.array(dec)
    got = group_by_sky(ra, dec, 10.0)
    assert np.array_equal(got, _brute_force_groups(ra, dec, 10.0))
    assert got[-3] == got[-4] and got[-1] == got[-2]  # across RA=0 and across the pole
    assert len(np.unique(got)) < len(ra) - 20  # the field really has groups


@pytest.mark.parametrize("radius_arcsec", [10.0, 60.0, 3600.0])
def test_group_by_sky_matches_brute_force_at_the_wrap_and_the_poles(radius_arcsec):
    # Dense random patches (about 10 radii across) straddling RA = 0/360 and round both
    # poles, plus a sparse full sky: an O(n^2) all-pairs haversine reference must agree.
    rng = np.random.default_rng(int(radius_arcsec))
    span = 5 * radius_arcsec / 3600
    patches = [
        (rng.uniform(-span, span, 150) % 360, rng.uniform(-span, span, 150)),  # across RA = 0/360
        (rng.uniform(0, 360, 150), 90 - rng.uniform(0, span, 150)),  # round the north pole
        (rng.uniform(0, 360, 150), -90 + rng.uniform(0, span, 150)),  # round the south pole
        (rng.uniform(0, 360, 150), np.degrees(np.arcsin(rng.uniform(-1, 1, 150)))),  # whole sky
    ]
    ra = np.concatenate([p[0] for p in patches])
    dec = np.concatenate([p[1] for p in patches])
    order = rng.permutation(len(ra))  # group ids are smallest indices: mix the patches
    ra, dec = ra[order], dec[order]

    r, d = np.radians(ra), np.radians(dec)
    hav = (
        np.sin((d[:, None] - d[None]) / 2) ** 2
        + np.cos(d[:, None]) * np.cos(d[None]) * np.sin((r[:, None] - r[None]) / 2) ** 2
    )
    linked = np.degrees(2 * np.arcsin(np.sqrt(np.clip(hav, 0, 1)))) * 3600 <= radius_arcsec
    expected = np.arange(len(ra))
    while True:  # propagate the smallest index through links until stable
        new = np.where(linked, expected[None], len(ra)).min(axis=1)
        if np.array_equal(new, expected):
            break
        expected = new

    got = group_by_sky(ra, dec, radius_arcsec)
    assert got.dtype == np.int64
    assert np.array_equal(got, expected)
    sizes = np.bincount(got)
    assert sizes.max() > 10 and (sizes == 1).sum() > 50  # both big groups and loners


def test_group_by_sky_chains_and_radius():
    # A-B 8", B-C 8", A-C 16": friends of friends puts all three together.
    dec = np.array([0.0, 8.0, 16.0, 100.0]) / 3600
    assert group_by_sky(np.zeros(4), dec, 10.0).tolist() == [0, 0, 0, 3]
    assert group_by_sky(np.zeros(4), dec, 5.0).tolist() == [0, 1, 2, 3]
    assert group_by_sky(np.array([1.0, np.nan, 1.0]), np.zeros(3), 10.0).tolist() == [0, 1, 0]


def test_split_is_stratified_deterministic_and_grouped():
    rng = np.random.default_rng(0)
    n = 3000
    labels = rng.choice(NUM_CLASSES, n, p=np.array([1, 2, 3, 2, 0.4, 2, 2, 3, 1.5, 2]) / 18.9)
    ra, dec = rng.uniform(0, 360, n), rng.uniform(-30, 60, n)
    dup = rng.choice(n, (60, 2), replace=False)  # 60 galaxies stored twice, 3" apart
    ra[dup[:, 1]], dec[dup[:, 1]] = ra[dup[:, 0]], dec[dup[:, 0]] + 3 / 3600
    splits, conflicts = split_indices(ra, dec, labels, (0.8, 0.1, 0.1), seed=5)
    again, _ = split_indices(ra, dec, labels, (0.8, 0.1, 0.1), seed=5)
    other, _ = split_indices(ra, dec, labels, (0.8, 0.1, 0.1), seed=6)
    assert all(np.array_equal(splits[s], again[s]) for s in SPLITS)
    assert not np.array_equal(splits["test"], other["test"])
    assert np.array_equal(np.sort(np.concatenate([splits[s] for s in SPLITS])), np.arange(n))
    where = np.empty(n, int)
    for k, s in enumerate(SPLITS):
        where[splits[s]] = k
    assert (where[dup[:, 0]] == where[dup[:, 1]]).all()
    for s, target in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert abs(len(splits[s]) / n - target) < 0.01
        for c in range(NUM_CLASSES):
            in_class = labels == c
            share = np.isin(np.flatnonzero(in_class), splits[s]).mean()
            assert abs(share - target) <= 0.01 + 2 / in_class.sum(), (s, c, share)
    conflicting = {tuple(sorted(g["indices"])) for g in conflicts}
    planted = {tuple(sorted(p)) for p in dup.tolist() if labels[p[0]] != labels[p[1]]}
    assert conflicting == planted
    for g in conflicts:
        assert g["labels"] == labels[g["indices"]].tolist()
        assert g["separations_arcsec"][0] == 0 and abs(g["separations_arcsec"][1] - 3) < 0.01


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        split_indices(np.zeros(3), np.zeros(3), np.zeros(3), (0.8, 0.3, 0.1))


# --- written shards ---------------------------------------------------------------------


def test_round_trip_every_sample_is_exact(sharded):
    cat = sharded.catalog
    seen = {}
    for tar_path in _tars(sharded.out):
        split = tar_path.parent.name
        with tarfile.open(tar_path) as tar:
            assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in tar.getmembers())
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in files})
        assert len(files) == 3 * len(keys)
        for key in keys:
            i = _source_index(key)
            assert key not in seen
            seen[key] = split
            image = np.asarray(Image.open(io.BytesIO(files[f"{key}.png"])))
            assert image.dtype == np.uint8 and np.array_equal(image, cat.images[i])
            assert int(files[f"{key}.cls"].decode("ascii")) == cat.labels[i]
            meta = json.loads(files[f"{key}.json"])
            assert meta == {
                "ra": cat.ra[i],
                "dec": cat.dec[i],
                "redshift": cat.redshift[i],
                "pxscale": cat.pxscale[i],
                "source_index": i,
                "source_file": "galaxies.h5",
                "split": split,
            }
    assert sorted(_source_index(k) for k in seen) == list(range(240))
    # Duplicates of one galaxy never straddle splits; conflicting labels are reported.
    for group in cat.groups:
        assert len({seen[f"g{i:07d}"] for i in group}) == 1, group
    reported = {tuple(sorted(g["indices"])) for g in sharded.summary["conflicting_groups"]}
    assert reported == {tuple(sorted(g)) for g in cat.conflicting}
    on_disk = json.loads((sharded.out / "splits.json").read_text())
    assert on_disk["conflicting_groups"] == sharded.summary["conflicting_groups"]


def test_webdataset_reads_the_shards(sharded):
    urls = [str(p) for p in sorted((sharded.out / "val").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "png", "cls"))
    assert len(samples) == read_manifest(sharded.out / "val")["num_samples"]
    for key, image, label in samples:
        assert np.array_equal(image, sharded.catalog.images[_source_index(key)])
        assert label == sharded.catalog.labels[_source_index(key)]


def test_index_matches_tar_members(sharded):
    for tar_path in _tars(sharded.out):
        index = read_index(tar_path.with_suffix(".idx"))
        first_line = tar_path.with_suffix(".idx").read_text().splitlines()[0]
        assert first_line == f"v1.2 {len(index)}"
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            expected = [(m.name, m.offset_data, m.size) for m in members]
            data = {m.name: tar.extractfile(m).read() for m in members}
        listed = [(c["name"], c["offset"], c["size"]) for s in index for c in s["components"]]
        assert listed == expected
        assert [[c["ext"] for c in s["components"]] for s in index] == [["png", "cls", "json"]] * len(index)
        raw = tar_path.read_bytes()
        for name, offset, size in listed:
            assert offset % 512 == 0 and raw[offset : offset + size] == data[name]


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_index_offsets_agree_with_gnu_tar(sharded):
    """DALI's wds2idx derives offsets from `tar --list --block-num`; ours must agree."""
    tar_path = _tars(sharded.out)[0]
    listing = subprocess.run(
        ["tar", "--list", "--block-num", "--file", str(tar_path)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    # "block N: name": a one-block GNU header at block N, the data right after it.
    from_tar = [
        (line.split(": ", 1)[1], (int(line.split()[1].rstrip(":")) + 1) * 512)
        for line in listing
        if "** Block of NULs **" not in line
    ]
    index = read_index(tar_path.with_suffix(".idx"))
    assert [(c["name"], c["offset"]) for s in index for c in s["components"]] == from_tar


def test_manifests_hashes_and_counts(sharded):
    total = 0
    for split in SPLITS:
        manifest = read_manifest(sharded.out / split)
        assert manifest["split"] == split
        assert manifest["class_names"] == list(CLASS_NAMES)
        assert manifest["image_size"] == 32 and manifest["image_format"] == "png"
        assert manifest["source"]["file"] == "galaxies.h5"
        assert manifest["source"]["sha256"] == hashlib.sha256(sharded.catalog.path.read_bytes()).hexdigest()
        counts = np.zeros(NUM_CLASSES, int)
        for shard in manifest["shards"]:
            for kind in ("tar", "idx"):
                path = sharded.out / split / shard[kind]["file"]
                assert shard[kind]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
                assert shard[kind]["bytes"] == path.stat().st_size
            index = read_index(sharded.out / split / shard["idx"]["file"])
            assert shard["num_samples"] == len(index)
            for sample in index:
                counts[sharded.catalog.labels[_source_index(sample["key"])]] += 1
        assert manifest["class_counts_by_index"] == counts.tolist()
        assert manifest["class_counts"] == dict(zip(CLASS_NAMES, counts.tolist()))
        assert manifest["num_samples"] == counts.sum()
        total += counts.sum()
    assert total == 240
    assert [s["num_samples"] for s in read_manifest(sharded.out / "train")["shards"]][:3] == [50, 50, 50]


def test_split_proportions_in_shards(sharded):
    counts = {s: np.array(read_manifest(sharded.out / s)["class_counts_by_index"]) for s in SPLITS}
    overall = sum(counts.values())
    for split, target in zip(SPLITS, (0.8, 0.1, 0.1)):
        share = counts[split] / overall
        assert np.all(np.abs(share - target) <= 0.1 + 1e-9), (split, share)  # 24 per class: +-2 galaxies


def test_same_seed_gives_byte_identical_shards(sharded, tmp_path):
    write_shards(sharded.catalog.path, tmp_path / "again", shard_size=50, seed=0)
    for a in _tars(sharded.out):
        b = tmp_path / "again" / a.relative_to(sharded.out)
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".idx").read_bytes() == b.with_suffix(".idx").read_bytes()


def test_jpg_shards_verify_and_stay_close(make_catalog, tmp_path):
    info = make_catalog(n=30, size=32)
    write_shards(info.path, tmp_path / "jpg", shard_size=10, image_format="jpg")
    assert verify_shards(tmp_path / "jpg")["train"] == read_manifest(tmp_path / "jpg" / "train")["num_samples"]
    tar_path = _tars(tmp_path / "jpg")[0]
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        image = np.asarray(Image.open(tar.extractfile(member)), dtype=float)
    assert np.abs(image - info.images[_source_index(member.name.split(".")[0])]).mean() < 4


def _encodings(out):
    """(image_format, jpeg_quality, lossless) of splits.json and of every split's manifest."""
    docs = [json.loads((out / "splits.json").read_text())] + [read_manifest(out / s) for s in SPLITS]
    return {(d["image_format"], d["jpeg_quality"], d["lossless"]) for d in docs}


def _images(out, ext):
    """{source index: decoded uint8 image} of every sample's ``.<ext>`` member, read with tarfile."""
    images = {}
    for tar_path in _tars(out):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(f".{ext}"):
                    data = tar.extractfile(m).read()
                    images[_source_index(m.name.split(".")[0])] = (data, np.asarray(Image.open(io.BytesIO(data))))
    return images


@pytest.mark.parametrize("fmt", ["png", "jp2"])
def test_lossless_formats_decode_to_the_catalog_pixels(sharded, sharded_as, fmt):
    out = sharded_as(fmt)
    images = _images(out, fmt)
    assert sorted(images) == list(range(240))
    for i, (data, image) in images.items():
        assert image.dtype == np.uint8 and np.array_equal(image, sharded.catalog.images[i]), i
        if fmt == "jp2":  # the JP2 container (colour space recorded), not a bare codestream
            assert data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n"
    assert _encodings(out) == {(fmt, None, True)}
    assert verify_shards(out) == verify_shards(sharded.out)
    assert read_index(out / "val" / "shard-000000.idx")[0]["components"][0]["ext"] == fmt


def test_jpeg_quality_is_recorded_and_trades_bytes_for_error(make_catalog, tmp_path):
    """`data shard --image-format jpeg --jpeg-quality Q` (or data.jpeg_quality of --config):
    every manifest and splits.json state the quality; a lower one gives smaller members and
    larger pixel errors; a manifest written before the quality was recorded still loads."""
    from galcf_hpc.cli import main
    from galcf_hpc.loaders.torch import ShardDataset

    info = make_catalog(n=40, size=32)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: {info.path}\n  image_format: jpeg\n  jpeg_quality: 40\n  shard_size: 10\n")
    shard = ["data", "shard", "--input", str(info.path), "--image-format", "jpeg"]
    assert main([*shard, "--out", str(tmp_path / "q95")]) == 0
    assert main(["data", "shard", "--config", str(config), "--out", str(tmp_path / "q40")]) == 0
    stats = {}
    for q in (95, 40):
        out = tmp_path / f"q{q}"
        assert _encodings(out) == {("jpg", q, False)}
        assert sum(verify_shards(out).values()) == 40
        images = _images(out, "jpg")
        error = np.mean([np.abs(img.astype(float) - info.images[i]).mean() for i, (_, img) in images.items()])
        stats[q] = (sum(len(data) for data, _ in images.values()), error)
    assert stats[40][0] < 0.8 * stats[95][0] and stats[40][1] > stats[95][1] > 0
    path = tmp_path / "q40" / "train" / "manifest.json"
    old = json.loads(path.read_text())
    del old["jpeg_quality"], old["lossless"]
    path.write_text(json.dumps(old))
    assert read_manifest(path.parent)["image_format"] == "jpg"
    assert ShardDataset(path.parent)[0]["image"].shape == (32, 32, 3)
    assert sum(verify_shards(tmp_path / "q40").values()) == 40


def test_unknown_format_or_quality_out_of_range_is_refused(make_catalog, tmp_path, sharded_copy):
    from galcf_hpc.cli import main
    from galcf_hpc.config import config_from_dict
    from galcf_hpc.errors import ConfigError

    info = make_catalog(n=10, size=32)
    for kwargs, message in [
        ({"image_format": "webp"}, "image format must be one of png, jpeg, jpg, jp2, got 'webp'"),
        ({"image_format": "jpeg", "jpeg_quality": 0}, "JPEG quality must be an integer from 1 to 100, got 0"),
        ({"image_format": "jpeg", "jpeg_quality": 101}, "from 1 to 100, got 101"),
        ({"image_format": "jpeg", "jpeg_quality": 90.5}, "from 1 to 100, got 90.5"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_shards(info.path, tmp_path / "out", **kwargs)
    shard = ["data", "shard", "--input", str(info.path), "--out", str(tmp_path / "out")]
    assert main([*shard, "--image-format", "jpeg", "--jpeg-quality", "101"]) == UsageError.exit_code
    assert main([*shard, "--image-format", "jp2", "--jpeg-quality", "80"]) == UsageError.exit_code
    with pytest.raises(SystemExit) as exc:
        main([*shard, "--image-format", "webp"])
    assert exc.value.code == UsageError.exit_code
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="'data.image_format': must be one of png, jpeg, jp2, got 'gif'"):
        config_from_dict({"data": {"image_format": "gif"}})
    with pytest.raises(ConfigError, match=r"'data.jpeg_quality': must be \[1, 100\], got 0"):
        config_from_dict({"data": {"jpeg_quality": 0}})
    bad_manifests = [
        ("image_format", "webp", r"image_format 'webp' is not one this package reads \(jp2, jpg, png\)"),
        ("jpeg_quality", 0, "jpeg_quality 0 is not an integer 1-100"),
    ]
    for key, value, message in bad_manifests:
        path = sharded_copy / "val" / "manifest.json"
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(DataError, match=rf"val/manifest\.json: {message}"):
            read_manifest(path.parent)
        path.write_text(json.dumps(manifest))


def test_unlabelled_catalog_is_refused(make_catalog, tmp_path):
    info = make_catalog(n=10, keys=("images", "ra", "dec"))
    with pytest.raises(DataError, match="cat.h5.*'ans'"):
        write_shards(info.path, tmp_path / "out")


# --- verification -----------------------------------------------------------------------


def test_verify_passes_on_good_shards(sharded):
    counts = verify_shards(sharded.out)
    assert counts == {s: read_manifest(sharded.out / s)["num_samples"] for s in SPLITS}
    assert sum(counts.values()) == 240


def _rehash_in_manifest(split_dir, shard_no):
    """Update a tar's size and sha256 in the manifest, as if it had been written so."""
    path = split_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["shards"][shard_no]["tar"]
    tar_path = split_dir / entry["file"]
    entry.update(bytes=tar_path.stat().st_size, sha256=hashlib.sha256(tar_path.read_bytes()).hexdigest())
    path.write_text(json.dumps(manifest))


def test_verify_names_truncated_tar(sharded_copy):
    tar_path = sharded_copy / "train" / "shard-000001.tar"
    tar_path.write_bytes(tar_path.read_bytes()[:7000])
    with pytest.raises(DataError, match=r"train/shard-000001\.tar: tar is truncated"):
        verify_shards(sharded_copy)


def test_verify_names_tar_with_a_changed_byte(sharded_copy, patch_member):
    tar_path = sharded_copy / "val" / "shard-000000.tar"
    patch_member(tar_path, 0, "png", lambda data: data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(DataError, match=r"val/shard-000000\.tar: size or sha256 differs"):
        verify_shards(sharded_copy)


def test_verify_names_stale_index(sharded_copy):
    """The tar is rewritten (samples reordered) and the manifest updated, the idx is not."""
    split_dir = sharded_copy / "test"
    tar_path = split_dir / "shard-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = members[3:] + members[:3]  # first sample moved to the end
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    _rehash_in_manifest(split_dir, 0)
    with pytest.raises(DataError, match=r"test/shard-000000\.idx: index does not match shard-000000\.tar"):
        verify_shards(sharded_copy)


def test_verify_names_missing_index(sharded_copy):
    (sharded_copy / "train" / "shard-000002.idx").unlink()
    with pytest.raises(DataError, match=r"train/shard-000002\.idx: index listed in the manifest is missing"):
        verify_shards(sharded_copy)


def test_verify_names_manifest_count_mismatch(sharded_copy):
    path = sharded_copy / "val" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["num_samples"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"val/manifest\.json: the shards hold \d+ samples"):
        verify_shards(sharded_copy)


def test_verify_names_sample_with_bad_label(sharded_copy, patch_member):
    """A label byte changed and every hash updated: only the content check can catch it."""
    split_dir = sharded_copy / "test"
    key = patch_member(split_dir / "shard-000000.tar", 2, "cls", lambda data: b"x")
    _rehash_in_manifest(split_dir, 0)
    with pytest.raises(DataError, match=rf"shard-000000\.tar: sample {key}: label 'x'"):
        verify_shards(sharded_copy)


@pytest.mark.parametrize("fmt", ["png", "jpg", "jp2"])
def test_verify_names_sample_with_undecodable_image(sharded_copy_as, patch_member, fmt):
    """An image member zeroed and every hash updated: the decoding check names the sample."""
    out = sharded_copy_as(fmt)
    key = patch_member(out / "val" / "shard-000000.tar", 4, fmt, lambda data: bytes(len(data)))
    _rehash_in_manifest(out / "val", 0)
    with pytest.raises(DataError, match=rf"val/shard-000000\.tar: sample {key}: image cannot be decoded"):
        verify_shards(out)


# --- atomic writes and reruns -----------------------------------------------------------


def _fail_after(monkeypatch, calls):
    original = shards.encode_image
    count = [0]

    def encode(*args):
        count[0] += 1
        if count[0] > calls:
            raise RuntimeError("interrupted (simulated)")
        return original(*args)

    monkeypatch.setattr(shards, "encode_image", encode)


def _manifests(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_interrupted_write_leaves_nothing(sharded, tmp_path, monkeypatch):
    _fail_after(monkeypatch, 120)  # in the middle of the third training shard
    with pytest.raises(RuntimeError, match="simulated"):
        write_shards(sharded.catalog.path, tmp_path / "out", shard_size=50)
    # the partial new set lived in the staging directory, which is gone
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not list((tmp_path / "out").glob(".staging-*"))


def test_interrupted_rerun_leaves_the_previous_shards_intact(sharded_copy, monkeypatch, sharded):
    before = _manifests(sharded_copy)
    _fail_after(monkeypatch, 75)
    with pytest.raises(RuntimeError, match="simulated"):
        write_shards(sharded.catalog.path, sharded_copy, shard_size=50, seed=1)
    assert _manifests(sharded_copy) == before  # every file, byte for byte, and nothing more
    assert verify_shards(sharded_copy) == {s: read_manifest(sharded_copy / s)["num_samples"] for s in SPLITS}


def test_run_killed_while_installing_leaves_nothing_vouching_for_a_mix(sharded_copy, monkeypatch, sharded):
    real, clear, moved = os.replace, shards._clear_previous_manifests, []

    def installing(out_dir):  # the new set is complete in staging; the renames begin
        clear(out_dir)
        moved.append("armed")

    def replace(src, dst):
        if moved and len(moved) == 4:
            raise KeyboardInterrupt  # a kill between two renames into place
        if moved:
            moved.append(dst)
        return real(src, dst)

    monkeypatch.setattr(shards, "_clear_previous_manifests", installing)
    monkeypatch.setattr(shards.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_shards(sharded.catalog.path, sharded_copy, shard_size=50, seed=1)
    monkeypatch.setattr(shards.os, "replace", real)
    assert len(moved) == 4 and list((sharded_copy / "train").glob("shard-*"))
    assert not list(sharded_copy.glob("*/manifest.json")) and not (sharded_copy / "splits.json").exists()
    with pytest.raises(DataError, match="splits.json: missing"):
        verify_shards(sharded_copy)
    # the rerun (same catalog) clears the staging left behind and completes
    assert list(sharded_copy.glob(".staging-*"))
    with pytest.raises(DataError, match="no splits.json"):
        write_shards(sharded.catalog.path, sharded_copy, shard_size=50, seed=1)
    write_shards(sharded.catalog.path, sharded_copy, shard_size=50, seed=1, overwrite=True)
    assert not list(sharded_copy.glob(".staging-*"))
    assert sum(verify_shards(sharded_copy).values()) == 240


def test_disk_full_while_resharding_keeps_the_old_set(sharded_copy, sharded, tmp_path):
    """A real write failure: `data shard --overwrite` under a file-size limit (ulimit -f,
    what a full disk or quota does to a write: EFBIG like ENOSPC) exits with the data-error
    code, says what happened and changes nothing in the output directory."""
    before = _manifests(sharded_copy)
    biggest_old = max(p.stat().st_size for p in sharded_copy.rglob("*.tar"))
    limit_kib = biggest_old // 1024 // 2  # the first new tar (100 galaxies) cannot be written
    cmd = (
        f"ulimit -f {limit_kib} && {sys.executable} -m galcf_hpc.cli data shard --input {sharded.catalog.path} "
        f"--out {sharded_copy} --shard-size 100 --seed 3 --overwrite"
    )
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert done.returncode == DataError.exit_code, done.stderr
    assert "File too large" in done.stderr and "nothing in" in done.stderr and "Traceback" not in done.stderr
    assert _manifests(sharded_copy) == before
    assert not list(sharded_copy.glob(".staging-*"))


def test_rerun_replaces_and_removes_stale_shards(sharded_copy, sharded):
    (sharded_copy / "train" / ".shard-000009.tar.abc.tmp").write_bytes(b"left by a killed run")
    write_shards(sharded.catalog.path, sharded_copy, shard_size=100, seed=2)
    assert sorted(p.name for p in (sharded_copy / "train").iterdir()) == [
        "manifest.json",
        "shard-000000.idx",
        "shard-000000.tar",
        "shard-000001.idx",
        "shard-000001.tar",
    ]
    assert verify_shards(sharded_copy) == {s: read_manifest(sharded_copy / s)["num_samples"] for s in SPLITS}
    assert json.loads((sharded_copy / "splits.json").read_text())["seed"] == 2


def test_progress_reports_every_shard(sharded, tmp_path):
    calls = []
    write_shards(sharded.catalog.path, tmp_path / "out", shard_size=50, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (240, 240) and len(calls) == 6
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


def test_shard_command_takes_split_settings_from_the_config(make_catalog, tmp_path):
    """`data shard --config` honours data.source/shards/shard_size/split_*/match_radius;
    options on the command line win; bad fractions and missing paths are clear errors."""
    from galcf_hpc.cli import main

    info = make_catalog(n=40, size=32)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data:\n  source: {info.path}\n  shards: {tmp_path / 'out'}\n  shard_size: 7\n"
        "  split_fractions: [0.5, 0.25, 0.25]\n  split_seed: 5\n  match_radius_arcsec: 3.5\n"
    )
    assert main(["data", "shard", "--config", str(config)]) == 0
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert splits["fractions"] == [0.5, 0.25, 0.25] and splits["seed"] == 5
    assert splits["match_radius_arcsec"] == 3.5 and splits["shard_size"] == 7
    assert main(["data", "shard", "--config", str(config), "--out", str(tmp_path / "o2"), "--seed", "9"]) == 0
    assert json.loads((tmp_path / "o2" / "splits.json").read_text())["seed"] == 9
    assert (
        main(
            ["data", "shard", "--input", str(info.path), "--out", str(tmp_path / "o3"), "--fractions", ".5", ".5", ".5"]
        )
        == UsageError.exit_code
    )
    assert not (tmp_path / "o3").exists()
    assert main(["data", "shard", "--out", str(tmp_path / "o4")]) == UsageError.exit_code


def test_sharding_another_catalog_into_a_data_set_is_refused(make_catalog, tmp_path):
    """4000 galaxies must not silently become 60: a directory holding another catalog's
    shards (or shard files nobody vouches for) is replaced only with overwrite."""
    big, small = make_catalog("big.h5", n=40, seed=1), make_catalog("small.h5", n=20, seed=2)
    out = tmp_path / "out"
    write_shards(big.path, out, shard_size=8)
    before = {p.name: p.read_bytes() for p in sorted((out / "train").iterdir())}
    with pytest.raises(
        DataError, match=r"out already holds shards of big.h5 \(40 galaxies\), not of small.h5.*--overwrite"
    ):
        write_shards(small.path, out, shard_size=8)
    assert {p.name: p.read_bytes() for p in sorted((out / "train").iterdir())} == before
    assert json.loads((out / "splits.json").read_text())["source"]["file"] == "big.h5"
    write_shards(big.path, out, shard_size=5, seed=3)  # the same catalog again: a reshard
    write_shards(small.path, out, shard_size=8, overwrite=True)
    assert verify_shards(out)["train"] + verify_shards(out)["val"] + verify_shards(out)["test"] == 20
    (out / "splits.json").unlink()  # shard files without provenance
    with pytest.raises(DataError, match="shard files but no splits.json"):
        write_shards(big.path, out)


def test_manifest_naming_a_file_elsewhere_is_refused(sharded_copy):
    """A manifest entry may only name shard-NNNNNN.tar/.idx of its own directory."""
    path = sharded_copy / "val" / "manifest.json"
    for bad in ("/etc/passwd", "../train/shard-000000.tar", "shard-000000.idx"):
        manifest = json.loads(path.read_text())
        manifest["shards"][0]["tar"]["file"] = bad
        path.write_text(json.dumps(manifest))
        with pytest.raises(DataError, match=r"val/manifest.json: shards\[0\] names tar file"):
            verify_shards(sharded_copy)


def test_verify_reports_progress_over_all_samples(sharded):
    calls = []
    counts = verify_shards(sharded.out, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (sum(counts.values()), sum(counts.values()))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) >= 3
