"""Split a catalog into train/val/test and write it as WebDataset shards with DALI indexes.

Layout written by :func:`write_shards`::

    out_dir/splits.json                 seed, fractions, counts, conflicting-label duplicates
    out_dir/<split>/shard-000000.tar    GNU tar, WebDataset samples
    out_dir/<split>/shard-000000.idx    DALI ``wds2idx`` index of that tar
    out_dir/<split>/manifest.json       counts per class, sha256/size of every tar and idx

A sample is three tar members sharing the key ``g<source index, 7 digits>``:
``<key>.png`` (or ``.jpg``, ``.jp2``: :data:`IMAGE_FORMATS`), ``<key>.cls`` (ASCII label) and
``<key>.json`` (ra, dec, redshift, pxscale, source index and file, split).

Index files follow DALI's format version ``v1.2`` (``tools/wds2idx.py`` and
``dali/operators/reader/loader/webdataset_loader.cc``): a first line ``v1.2 <samples>``,
then one line per sample with ``<ext> <offset> <size> <member name>`` for each component,
space separated, where ``offset`` is the byte offset of the member's *data* (header
offset + header size, a multiple of 512) -- DALI seeks there and reads ``size`` bytes.

Reruns and failures: the new set is first written completely into a staging directory
``out_dir/.staging-<pid>/`` (same file system). A failure there (disk full, quota, a file
size limit, a kill) leaves the shards already in ``out_dir`` untouched; the staging
directory is removed (or, after a kill, by the next run). Only then are ``splits.json``
and the manifests removed, the new files renamed into place (renames need no space), stale
shards of the earlier set deleted and the new ``splits.json`` written last. A run killed
within those renames leaves no manifest that would vouch for a mix of old and new shards:
readers refuse the directory until a rerun completes.
"""

import io
import json
import math
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from galcf_hpc.data.classes import CLASS_NAMES, NUM_CLASSES
from galcf_hpc.data.galaxy10 import open_catalog
from galcf_hpc.errors import DataError
from galcf_hpc.fileio import atomic_path, file_sha256, write_json

SPLITS = ("train", "val", "test")
# Image encodings (the name `data shard --image-format` takes -> the tar member's extension,
# which is also what the manifests record). png and jp2 (JPEG 2000, reversible 5/3 wavelet)
# are lossless; jpg is lossy at a stated quality. DALI's `fn.decoders.image` decodes all three
# on the CPU (checked with DALI 2.4: jp2 in the JP2 container, exact pixels); `mixed` decodes
# JPEG and JPEG 2000 on the GPU, PNG always on the CPU.
IMAGE_FORMATS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "jp2": "jp2"}
LOSSLESS_FORMATS = ("png", "jp2")
DEFAULT_JPEG_QUALITY = 95
INDEX_VERSION = "v1.2"
MANIFEST_FORMAT = "galcf-hpc-shards/1"
_TAR_BLOCK = 512
_SHARD_NAME = re.compile(r"^shard-\d{6}\.(tar|idx)$")
# Fixed member metadata: the same catalog, seed and settings give byte-identical tars.
_MTIME = 0
_MODE = 0o644
_READ_BLOCK = 64  # images read from the catalog at a time while writing a shard
_REDO = "regenerate the shards with `galcf-hpc data shard`"


def sample_key(source_index):
    """Stable WebDataset key of a catalog galaxy."""
    return f"g{int(source_index):07d}"


# ---------------------------------------------------------------------------------------
# Splitting


def _unit_vectors(ra, dec):
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)


def _chord_to_arcsec(chord):
    return np.degrees(2 * np.arcsin(np.clip(chord / 2, 0, 1))) * 3600


def group_by_sky(ra, dec, match_radius_arcsec=10.0):
    """Friends-of-friends groups on the sphere: an int64 group id per galaxy.

    Galaxies closer than ``match_radius_arcsec`` (and chains of such pairs) share a group:
    pairs come from a k-d tree over unit vectors (chord length of the radius; no RA
    wrap-around or pole to special-case), groups are the connected components of the
    pair graph. Galaxies with a non-finite position, and all of them when the radius is
    <= 0, are groups of their own. The group id is the smallest member index.
    """
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    n = ra.shape[0]
    finite = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    if match_radius_arcsec <= 0 or finite.size < 2:
        return np.arange(n)
    link = 2 * math.sin(math.radians(match_radius_arcsec / 3600) / 2)
    pairs = cKDTree(_unit_vectors(ra[finite], dec[finite])).query_pairs(link, output_type="ndarray")
    edges = finite[pairs]
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    # The first occurrence of each component label is that component's smallest member.
    _, first = np.unique(component, return_index=True)
    return first[component].astype(np.int64)


def _check_fractions(fractions):
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers summing to 1 "
                         f"(train, val, test), got {fractions}")
    return fractions


def split_indices(ra, dec, labels, fractions=(0.8, 0.1, 0.1), seed=0, match_radius_arcsec=10.0):
    """Stratified, sky-grouped train/val/test split.

    Galaxies within ``match_radius_arcsec`` of each other (repeated or overlapping
    cutouts, see :func:`group_by_sky`) always land in the same split, so a duplicate
    cannot leak a test galaxy into training. Groups are stratified by their majority label
    (ties: the smaller label): within each class the groups are shuffled (seeded) and laid
    end to end, and a group goes to the split whose share of the class its midpoint falls
    in, which keeps every split's class proportions within a group of the target.

    Returns ``({split: sorted int64 indices}, conflicts)`` where ``conflicts`` lists the
    groups whose members carry different labels: ``indices``, ``labels`` and
    ``separations_arcsec`` (of each member from the first).
    """
    fractions = _check_fractions(fractions)
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    n = ra.shape[0]
    labels = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if dec.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"ra, dec and labels need the same length, got {n}, {dec.shape}, {labels.shape}")
    group = group_by_sky(ra, dec, match_radius_arcsec)
    roots, member_of = np.unique(group, return_inverse=True)
    members = np.split(np.argsort(member_of, kind="stable"), np.cumsum(np.bincount(member_of))[:-1])

    conflicts = []
    stratum = np.empty(len(roots), dtype=np.int64)
    for g, idx in enumerate(members):
        if len(idx) == 1:
            stratum[g] = labels[idx[0]]
            continue
        values, votes = np.unique(labels[idx], return_counts=True)
        stratum[g] = values[np.argmax(votes)]
        if len(values) > 1:
            xyz = _unit_vectors(ra[idx], dec[idx])
            conflicts.append({
                "indices": idx.tolist(),
                "labels": labels[idx].tolist(),
                "separations_arcsec": _chord_to_arcsec(np.linalg.norm(xyz - xyz[0], axis=1)).round(3).tolist(),
            })

    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions)[:-1]
    assigned = {name: [] for name in SPLITS}
    for cls in np.unique(stratum):
        groups = rng.permutation(np.flatnonzero(stratum == cls))
        sizes = np.array([len(members[g]) for g in groups])
        midpoints = (np.cumsum(sizes) - sizes / 2) / sizes.sum()
        which = np.searchsorted(bounds, midpoints, side="right")
        for g, s in zip(groups, which):
            assigned[SPLITS[s]].append(members[g])
    splits = {name: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
              for name, parts in assigned.items()}
    return splits, conflicts


# ---------------------------------------------------------------------------------------
# Writing


def image_encoding(image_format, jpeg_quality=DEFAULT_JPEG_QUALITY):
    """(member extension, JPEG quality or None) of an ``--image-format`` name and quality;
    ValueError naming the choices or the range."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    ext = IMAGE_FORMATS[image_format]
    if ext != "jpg":
        return ext, None
    whole = isinstance(jpeg_quality, (int, float)) and not isinstance(jpeg_quality, bool) and (
        float(jpeg_quality).is_integer())
    if not whole or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"JPEG quality must be an integer from 1 to 100, got {jpeg_quality!r}")
    return ext, int(jpeg_quality)


def encode_image(image, ext, jpeg_quality=None):
    """Bytes of an RGB uint8 [S, S, 3] image as tar member ``.<ext>``."""
    buf = io.BytesIO()
    if ext == "png":
        Image.fromarray(image).save(buf, format="PNG")
    elif ext == "jp2":
        # reversible wavelet + reversible colour transform: lossless; the JP2 container (not a
        # bare codestream) carries the sRGB colour space, which DALI's decoder reads without warning
        Image.fromarray(image).save(buf, format="JPEG2000", irreversible=False, mct=1)
    else:
        # no chroma subsampling: colour is a class cue here (g/r/z rendered as RGB)
        Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    return buf.getvalue()


def _member(name, size):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _MTIME
    info.mode = _MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _write_tar(tar_path, samples):
    """Write ``samples`` (key, [(ext, bytes), ...]) as a GNU tar; return its index rows.

    Each row is (key, [(ext, data offset, size, member name), ...]).
    """
    rows = []
    with atomic_path(tar_path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for key, parts in samples:
                components = []
                for ext, data in parts:
                    name = f"{key}.{ext}"
                    tar.addfile(_member(name, len(data)), io.BytesIO(data))
                    padded = -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
                    components.append((ext, tar.offset - padded, len(data), name))
                rows.append((key, components))
    return rows


def format_index(rows):
    """DALI ``wds2idx`` v1.2 text for index rows (key, [(ext, offset, size, name), ...])."""
    lines = [f"{INDEX_VERSION} {len(rows)}"]
    for _, components in rows:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components))
    return "\n".join(lines) + "\n"


def _file_entry(path):
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _clear_previous_manifests(out_dir):
    """Remove the manifests first, so an interrupted rerun leaves nothing vouching for a
    mix of old and new shards."""
    (out_dir / "splits.json").unlink(missing_ok=True)
    for tmp in out_dir.glob(".splits.json.*.tmp"):
        tmp.unlink()
    for split in SPLITS:
        (out_dir / split / "manifest.json").unlink(missing_ok=True)


def _remove_stale(split_dir, keep):
    """Delete shards of an earlier run not listed in the new manifest, and temp files
    left by a killed run (atomic writes use ``.<name>.*.tmp``)."""
    removed = []
    for path in sorted(split_dir.iterdir()):
        stale_shard = _SHARD_NAME.match(path.name) and path.name not in keep
        stale_tmp = path.name.startswith((".shard-", ".manifest.json.")) and path.name.endswith(".tmp")
        if path.is_file() and (stale_shard or stale_tmp):
            path.unlink()
            removed.append(path.name)
    return removed


def _check_replaceable(out_dir, source, overwrite):
    """Refuse to replace a data set that another catalog was sharded into (or shard files
    nobody vouches for) unless ``overwrite``: a rerun from the same catalog is fine."""
    if overwrite or not out_dir.is_dir():
        return
    old = out_dir / "splits.json"
    ours = [p for split in SPLITS if (out_dir / split).is_dir() for p in (out_dir / split).iterdir()
            if _SHARD_NAME.match(p.name)]
    redo = "pass --overwrite to `galcf-hpc data shard` to replace them, or choose another output directory"
    if old.is_file():
        try:
            previous = json.loads(old.read_text())["source"]
            same = previous["sha256"] == source["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            previous, same = None, False
        if not same:
            what = (f"shards of {previous.get('file')} ({previous.get('num_galaxies')} galaxies)"
                    if isinstance(previous, dict) else "shards with an unreadable splits.json")
            raise DataError(f"{out_dir} already holds {what}, not of {source['file']}; {redo}")
    elif ours:
        raise DataError(f"{out_dir} holds {len(ours)} shard files but no splits.json (an interrupted write, or "
                        f"not written by galcf-hpc), so nothing says which catalog they came from; {redo}")


def write_shards(catalog_path, out_dir, shard_size=1000, fractions=(0.8, 0.1, 0.1), seed=0,
                 image_format="png", progress=None, match_radius_arcsec=10.0, overwrite=False,
                 jpeg_quality=DEFAULT_JPEG_QUALITY):
    """Split a Galaxy10-format catalog and write WebDataset shards, indexes and manifests.

    ``image_format``: ``"png"`` or ``"jp2"`` (lossless JPEG 2000): decoded pixels equal the
    catalog's; ``"jpeg"`` (or ``"jpg"``): lossy at ``jpeg_quality`` (1-100), no chroma
    subsampling. The manifests and ``splits.json`` record the member extension
    (``image_format``), ``jpeg_quality`` (None unless jpg) and ``lossless``. Samples are in a
    per-seed shuffled order. ``progress(done, total)`` is called with sample counts after
    every shard. Returns the summary that is also written to ``out_dir/splits.json``. An
    ``out_dir`` that holds shards of another catalog is refused unless ``overwrite``.
    """
    image_format, jpeg_quality = image_encoding(image_format, jpeg_quality)
    if int(shard_size) != shard_size or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    fractions = _check_fractions(fractions)
    out_dir = Path(out_dir)
    catalog_path = Path(catalog_path)

    with open_catalog(catalog_path) as cat:
        if cat.labels is None:
            raise DataError(f"{catalog_path}: key 'ans' (labels) is missing; training shards need "
                            "labels -- use a labelled catalog, or run the catalog job on unlabelled data")
        splits, conflicts = split_indices(cat.ra, cat.dec, cat.labels, fractions, seed, match_radius_arcsec)
        source = {"file": catalog_path.name, "sha256": file_sha256(catalog_path), "num_galaxies": cat.n}
        _check_replaceable(out_dir, source, overwrite)
        summary = {
            "source": source, "seed": seed, "fractions": list(fractions),
            "match_radius_arcsec": match_radius_arcsec, "shard_size": int(shard_size),
            "image_format": image_format, "jpeg_quality": jpeg_quality,
            "lossless": image_format in LOSSLESS_FORMATS, "image_size": cat.image_size, "splits": {},
            "conflicting_groups": conflicts,
        }
        for old in out_dir.glob(".staging-*"):  # left by a killed run
            shutil.rmtree(old, ignore_errors=True)
        staging = out_dir / f".staging-{os.getpid()}"
        try:
            manifests = _write_splits(cat, catalog_path, staging, splits, seed, int(shard_size),
                                      image_format, source, fractions, summary, progress)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError):
                raise DataError(
                    f"sharding {catalog_path} into {out_dir} failed ({exc}); nothing in {out_dir} was "
                    "changed and the partial new set was removed. If the disk or quota is full, free space "
                    "(the new set is written in full before the old one is replaced) or choose another "
                    "--out, then rerun"
                ) from exc
            raise
    _install(staging, out_dir, manifests)
    try:
        write_json(out_dir / "splits.json", summary)
    except OSError as exc:
        raise DataError(f"the shards are in {out_dir} but writing its splits.json failed ({exc}); rerun") from exc
    return summary


def _write_splits(cat, catalog_path, staging, splits, seed, shard_size, image_format, source, fractions,
                  summary, progress):
    """Every split's tars, indexes and manifest under ``staging``; {split: its manifest's file
    names}."""
    total, done, manifests = cat.n, 0, {}
    for split_no, split in enumerate(SPLITS):
        split_dir = staging / split
        split_dir.mkdir(parents=True, exist_ok=True)
        # One stream per split, so a split's order does not depend on the others' sizes.
        order = np.random.default_rng([seed, split_no]).permutation(splits[split])
        shards = []
        for shard_no, start in enumerate(range(0, len(order), shard_size)):
            indices = order[start:start + shard_size]
            samples = []
            for block_start in range(0, len(indices), _READ_BLOCK):
                block = indices[block_start:block_start + _READ_BLOCK]
                for i, image in zip(block.tolist(), cat.read_images(block)):
                    meta = {
                        "ra": _finite_or_none(cat.ra[i]), "dec": _finite_or_none(cat.dec[i]),
                        "redshift": _finite_or_none(cat.redshift[i]),
                        "pxscale": _finite_or_none(cat.pxscale[i]),
                        "source_index": i, "source_file": catalog_path.name, "split": split,
                    }
                    samples.append((sample_key(i), [
                        (image_format, encode_image(image, image_format, summary["jpeg_quality"])),
                        ("cls", str(int(cat.labels[i])).encode("ascii")),
                        ("json", json.dumps(meta, sort_keys=True).encode("utf-8")),
                    ]))
            tar_path = split_dir / f"shard-{shard_no:06d}.tar"
            idx_path = tar_path.with_suffix(".idx")
            rows = _write_tar(tar_path, samples)
            with atomic_path(idx_path) as tmp:
                tmp.write_text(format_index(rows))
            shards.append({"num_samples": len(rows), "tar": _file_entry(tar_path),
                           "idx": _file_entry(idx_path)})
            done += len(rows)
            if progress is not None:
                progress(done, total)
        class_counts = np.bincount(cat.labels[order], minlength=NUM_CLASSES).tolist()
        write_json(split_dir / "manifest.json", {
            "format": MANIFEST_FORMAT, "split": split, "num_samples": int(len(order)),
            "class_names": list(CLASS_NAMES),
            "class_counts": dict(zip(CLASS_NAMES, class_counts)),
            "class_counts_by_index": class_counts,
            "image_size": cat.image_size, "image_format": image_format,
            "jpeg_quality": summary["jpeg_quality"], "lossless": summary["lossless"],
            "source": source, "seed": seed, "fractions": list(fractions), "shards": shards,
        })
        manifests[split] = [s[k]["file"] for s in shards for k in ("tar", "idx")]
        summary["splits"][split] = {"num_samples": int(len(order)), "num_shards": len(shards),
                                    "class_counts_by_index": class_counts}
    return manifests


def _install(staging, out_dir, manifests):
    """Replace the shard set in ``out_dir`` by the complete one in ``staging``: manifests
    removed first (nothing vouches for a mix), files renamed into place, each split's
    manifest last, stale shards of the earlier set deleted."""
    _clear_previous_manifests(out_dir)
    for split, files in manifests.items():
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        for name in [*files, "manifest.json"]:
            os.replace(staging / split / name, split_dir / name)
        _remove_stale(split_dir, set(files))
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Reading and verifying


def read_manifest(split_dir):
    """The parsed ``manifest.json`` of a split directory; DataError if missing or malformed."""
    path = Path(split_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: manifest is missing (the split was never written, or a write "
                        f"was interrupted); {_REDO}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: manifest cannot be parsed ({exc}); {_REDO}") from None
    required = {"split": str, "num_samples": int, "class_names": list, "class_counts_by_index": list,
                "image_size": int, "image_format": str, "shards": list}
    for key, kind in required.items():
        if not isinstance(manifest, dict) or not isinstance(manifest.get(key), kind):
            raise DataError(f"{path}: key '{key}' is missing or not a {kind.__name__}; {_REDO}")
    known = sorted(set(IMAGE_FORMATS.values()))
    if manifest["image_format"] not in known:
        raise DataError(f"{path}: image_format {manifest['image_format']!r} is not one this package reads "
                        f"({', '.join(known)}); {_REDO}")
    quality = manifest.get("jpeg_quality")  # absent in manifests written before it was recorded
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100):
        raise DataError(f"{path}: jpeg_quality {quality!r} is not an integer 1-100; {_REDO}")
    for n, shard in enumerate(manifest["shards"]):
        ok = isinstance(shard, dict) and isinstance(shard.get("num_samples"), int) and all(
            isinstance(shard.get(k), dict) and {"file", "bytes", "sha256"} <= shard[k].keys()
            for k in ("tar", "idx"))
        if not ok:
            raise DataError(f"{path}: shards[{n}] lacks num_samples or tar/idx file, bytes, sha256; {_REDO}")
        for k in ("tar", "idx"):  # a file of this split: never a path that leads elsewhere
            name = shard[k]["file"]
            if not isinstance(name, str) or not _SHARD_NAME.match(name) or not name.endswith(f".{k}"):
                raise DataError(f"{path}: shards[{n}] names {k} file {name!r}; a manifest lists files of its "
                                f"own directory named shard-NNNNNN.{k}; {_REDO}")
    return manifest


def read_index(idx_path):
    """Parse a DALI webdataset index (v1.1 or v1.2).

    Returns one dict per sample: ``{"key": str or None, "components": [{"ext", "offset",
    "size", "name"}, ...]}`` in file order (``name``/``key`` are None for v1.1 files,
    which carry no member names).
    """
    idx_path = Path(idx_path)

    def bad(line_no, what):
        return DataError(f"{idx_path}: line {line_no}: {what}; regenerate the index "
                         f"(`galcf-hpc data shard`, or DALI's `wds2idx`)")

    try:
        lines = idx_path.read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        raise DataError(f"{idx_path}: index file is missing; {_REDO}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{idx_path}: cannot be read ({exc}); {_REDO}") from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] not in ("v1.1", "v1.2") or not header[1].isdigit():
        raise bad(1, f"expected '<v1.1|v1.2> <sample count>', got {lines[0] if lines else ''!r}")
    width = 4 if header[0] == "v1.2" else 3
    count = int(header[1])
    body = lines[1:]
    if len(body) != count:
        raise bad(1, f"header announces {count} samples but {len(body)} sample lines follow")
    samples = []
    for line_no, line in enumerate(body, start=2):
        fields = line.split()
        if not fields or len(fields) % width:
            raise bad(line_no, f"expected groups of {width} fields '<ext> <offset> <size>"
                      f"{' <name>' if width == 4 else ''}', got {line!r}")
        components = []
        for k in range(0, len(fields), width):
            ext, offset, size = fields[k:k + 3]
            if not (offset.isdigit() and size.isdigit()) or int(offset) % _TAR_BLOCK:
                raise bad(line_no, f"component {ext!r} has offset {offset!r} / size {size!r}; "
                          f"offsets are non-negative multiples of {_TAR_BLOCK}")
            components.append({"ext": ext, "offset": int(offset), "size": int(size),
                               "name": fields[k + 3] if width == 4 else None})
        name = components[0]["name"]
        key = name[:name.find(".", name.rfind("/") + 1)] if name else None
        samples.append({"key": key, "components": components})
    return samples


def _scan_tar(tar_path):
    """(member name, data offset, size) of every regular file in a tar."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{tar_path}: tar cannot be read ({exc}): the shard is truncated or corrupt; "
                        f"{_REDO}") from None
    return [(m.name, m.offset_data, m.size) for m in members if m.isreg()]


def _check_file(path, entry, kind):
    if not path.is_file():
        raise DataError(f"{path}: {kind} listed in the manifest is missing; {_REDO}")
    size = path.stat().st_size
    if size < entry["bytes"]:
        raise DataError(f"{path}: {kind} is truncated ({size} of {entry['bytes']} bytes); {_REDO}")


def _verify_shard(split_dir, manifest, shard, seen, class_counts):
    tar_path = split_dir / shard["tar"]["file"]
    idx_path = split_dir / shard["idx"]["file"]
    _check_file(tar_path, shard["tar"], "tar")
    _check_file(idx_path, shard["idx"], "index")
    members = _scan_tar(tar_path)
    index = read_index(idx_path)
    listed = [(c["name"], c["offset"], c["size"]) for s in index for c in s["components"]]
    if listed != members:
        first = next((k for k, (a, b) in enumerate(zip(listed, members)) if a != b), min(len(listed), len(members)))
        where = listed[first][0] if first < len(listed) else members[first][0] if first < len(members) else "end"
        raise DataError(f"{idx_path}: index does not match {tar_path.name} (first difference at member "
                        f"{where}; index lists {len(listed)} members, tar has {len(members)}): the tar was "
                        f"rewritten without its index, or the index is stale; {_REDO}")
    for path, entry in ((tar_path, shard["tar"]), (idx_path, shard["idx"])):
        size = path.stat().st_size
        if size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise DataError(f"{path}: size or sha256 differs from the manifest ({size} bytes, manifest "
                            f"{entry['bytes']}): the file changed after it was written; {_REDO}")
    if len(index) != shard["num_samples"]:
        raise DataError(f"{idx_path}: {len(index)} samples, manifest says {shard['num_samples']}; {_REDO}")

    image_ext, size, split = manifest["image_format"], manifest["image_size"], manifest["split"]
    expected = {image_ext, "cls", "json"}
    with open(tar_path, "rb") as f:
        for sample in index:
            key = sample["key"]
            where = f"{tar_path}: sample {key}"
            parts = {}
            for c in sample["components"]:
                f.seek(c["offset"])
                parts[c["ext"]] = f.read(c["size"])
            if set(parts) != expected:
                raise DataError(f"{where} has members {sorted(parts)}, expected {sorted(expected)}; {_REDO}")
            if key in seen:
                raise DataError(f"{where}: key also in {seen[key]}; keys must be unique across splits; {_REDO}")
            seen[key] = str(tar_path)
            try:
                with Image.open(io.BytesIO(parts[image_ext])) as img:
                    img.load()
                    mode, img_size = img.mode, img.size
            except Exception as exc:  # Pillow raises many types for corrupt data
                raise DataError(f"{where}: image cannot be decoded ({exc}); {_REDO}") from None
            if mode != "RGB" or img_size != (size, size):
                raise DataError(f"{where}: image is {mode} {img_size}, manifest says RGB {size}x{size}; {_REDO}")
            label = parts["cls"].decode("ascii", "replace").strip()
            if not label.isdigit() or int(label) >= NUM_CLASSES:
                raise DataError(f"{where}: label {label!r} is not a class 0-{NUM_CLASSES - 1}; {_REDO}")
            class_counts[int(label)] += 1
            try:
                meta = json.loads(parts["json"])
            except ValueError as exc:
                raise DataError(f"{where}: json cannot be parsed ({exc}); {_REDO}") from None
            if meta.get("split") != split or sample_key(meta.get("source_index", -1)) != key:
                raise DataError(f"{where}: json says split {meta.get('split')!r}, source index "
                                f"{meta.get('source_index')!r}; expected split {split!r} and key {key}; {_REDO}")


def verify_shards(out_dir, progress=None):
    """Re-check a shard directory end to end; return ``{split: number of samples}``.
    ``progress(done, total)`` is called with sample counts after every shard.

    Checks manifests, presence, size and sha256 of every tar and idx, that each tar parses
    and its index points at its members' data, that every sample has image + cls + json,
    decodes to an RGB image of the manifest's size, carries a valid label and the right
    split, that keys are unique across splits and that class counts match the manifests.
    Raises DataError naming the first bad file (and sample key).
    """
    out_dir = Path(out_dir)
    if not (out_dir / "splits.json").is_file():
        raise DataError(f"{out_dir / 'splits.json'}: missing (not a shard directory, or the write was "
                        f"interrupted); {_REDO}")
    seen = {}
    counts = {}
    manifests = {split: read_manifest(out_dir / split) for split in SPLITS}
    total, done = sum(m["num_samples"] for m in manifests.values()), 0
    for split in SPLITS:
        split_dir = out_dir / split
        manifest = manifests[split]
        where = split_dir / "manifest.json"
        if manifest["split"] != split:
            raise DataError(f"{where}: says split {manifest['split']!r}, but it lies in {split_dir}; {_REDO}")
        class_counts = [0] * NUM_CLASSES
        for shard in manifest["shards"]:
            _verify_shard(split_dir, manifest, shard, seen, class_counts)
            done += shard["num_samples"]
            if progress is not None:
                progress(done, total)
        n = sum(class_counts)
        if n != manifest["num_samples"] or class_counts != manifest["class_counts_by_index"]:
            raise DataError(f"{where}: the shards hold {n} samples with class counts {class_counts}, the "
                            f"manifest says {manifest['num_samples']} and {manifest['class_counts_by_index']}; "
                            f"{_REDO}")
        counts[split] = n
    return counts
