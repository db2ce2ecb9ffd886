"""Shard image formats: bytes per galaxy and one-thread CPU decode rates (Pillow and DALI-CPU).

    nice python3 benchmarks/formats.py [--sizes 64 256] [--out formats.json]

For every image size the catalog is sharded as ``galcf-hpc data shard`` does, once per format
(png, lossless jp2, jpeg at ``--qualities``), into a cache directory (reused when the
catalog and format are the same). Reported per format, with png as the baseline ratio:

- bytes per galaxy: all tar bytes of the three splits (tar headers, label and json members
  included) over the number of galaxies, and the mean image member alone;
- decode images/s on one thread, the same ``--decode`` image members of the train split for
  both decoders: Pillow (``Image.open(...).convert("RGB")`` as the torch back-end does) and
  DALI ``fn.decoders.image(device="cpu")`` with ``num_threads=1`` (images fed by
  ``external_source`` in batches of ``--batch``, so only decoding is timed); median of
  ``--repeats`` passes after one warm-up pass;
- pixel error of the decoded images against the catalog (0 for lossless formats) and the
  largest difference between the two decoders.

Catalogs: 64 px is the smoke data (``data/smoke/synthetic.h5`` when present, else rendered
like ``galcf-hpc data synth --n 4000 --size 64 --seed 0``); other sizes are rendered with
GalSim (``--galaxies`` of them, seed 0) into the cache. Prints a table and writes JSON.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from galcf_hpc.data.galaxy10 import open_catalog  # noqa: E402
from galcf_hpc.data.shards import SPLITS, read_index, read_manifest, write_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "data" / "smoke" / "synthetic.h5"


def catalog_for(size, galaxies, cache, workers):
    """The catalog measured at ``size`` px: the smoke data at 64 px, else rendered once."""
    if size == 64 and SMOKE.is_file():
        return SMOKE
    n = 4000 if size == 64 else galaxies
    path = cache / f"synthetic-{size}px-{n}.h5"
    if not path.is_file():
        from galcf_hpc.data.galaxy10 import write_catalog
        from galcf_hpc.data.synth import generate

        print(f"rendering {n} galaxies at {size} px into {path} (once; reused later)", flush=True)
        cat = generate(n, size, seed=0, workers=workers)
        write_catalog(path, **cat, attrs={"generator": "benchmarks/formats.py", "seed": 0})
    return path


def shards_for(catalog, fmt, quality, cache):
    """Shards of ``catalog`` in one format (written once per catalog and format)."""
    name = f"{catalog.stem}-{fmt}" + (f"{quality}" if quality else "")
    out = cache / name
    splits = out / "splits.json"
    if splits.is_file():
        done = json.loads(splits.read_text())
        if done["source"]["file"] == catalog.name and done.get("jpeg_quality") == quality:
            return out, None
    start = time.perf_counter()
    write_shards(catalog, out, shard_size=500, seed=0, image_format=fmt, jpeg_quality=quality, overwrite=True)
    return out, time.perf_counter() - start


def shard_bytes(out):
    """(tar bytes per galaxy, mean image member bytes) over all three splits."""
    tar_bytes, image_bytes, n = 0, 0, 0
    for split in SPLITS:
        manifest = read_manifest(out / split)
        ext = manifest["image_format"]
        for shard in manifest["shards"]:
            tar_bytes += shard["tar"]["bytes"]
            for sample in read_index(out / split / shard["idx"]["file"]):
                image_bytes += next(c["size"] for c in sample["components"] if c["ext"] == ext)
        n += manifest["num_samples"]
    return tar_bytes / n, image_bytes / n


def image_members(out, count):
    """[(source index, encoded bytes)] of the first ``count`` samples of the train split."""
    split = out / "train"
    manifest = read_manifest(split)
    members = []
    for shard in manifest["shards"]:
        with open(split / shard["tar"]["file"], "rb") as f:
            for sample in read_index(split / shard["idx"]["file"]):
                c = next(c for c in sample["components"] if c["ext"] == manifest["image_format"])
                f.seek(c["offset"])
                members.append((int(sample["key"][1:]), f.read(c["size"])))
                if len(members) == count:
                    return members
    return members


def pil_decode(blobs):
    import io

    from PIL import Image

    out = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as img:
            out.append(np.asarray(img.convert("RGB")))
    return out


class DaliDecoder:
    """``fn.decoders.image(device="cpu")`` on one thread, fed encoded bytes batch by batch."""

    def __init__(self, batch):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        @pipeline_def
        def decode():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

        self.batch = batch
        self.pipe = decode(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
        self.pipe.build()

    def __call__(self, blobs):
        out = []
        for start in range(0, len(blobs), self.batch):
            chunk = [np.frombuffer(b, dtype=np.uint8) for b in blobs[start : start + self.batch]]
            self.pipe.feed_input("encoded", chunk)
            (images,) = self.pipe.run()
            out.extend(np.array(images[i]) for i in range(len(chunk)))
        return out


def rate(decode, blobs, repeats):
    """(images/s, images per CPU second, decoded images): medians over ``repeats`` passes after
    a warm-up pass. CPU time is the whole process's (all threads): it shows a decoder that
    uses more than one thread, and it is what a shared machine's load disturbs least."""
    images = decode(blobs)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        decode(blobs)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return len(blobs) / statistics.median(wall), len(blobs) / statistics.median(cpu), images


def measure(catalog, fmt, quality, cache, count, repeats, batch):
    out, write_s = shards_for(catalog, fmt, quality, cache)
    per_galaxy, per_image = shard_bytes(out)
    members = image_members(out, count)
    blobs = [b for _, b in members]
    pil_rate, pil_cpu_rate, pil_images = rate(pil_decode, blobs, repeats)
    dali_rate, dali_cpu_rate, dali_images = rate(DaliDecoder(min(batch, len(blobs))), blobs, repeats)
    with open_catalog(catalog) as cat:
        truth = cat.read_images(np.array([i for i, _ in members]))
    error = np.abs(np.stack(pil_images).astype(np.int16) - truth)
    decoders = np.abs(np.stack(pil_images).astype(np.int16) - np.stack(dali_images))
    return {
        "format": fmt,
        "jpeg_quality": quality,
        "shards": str(out),
        "shard_write_seconds": write_s,
        "bytes_per_galaxy": per_galaxy,
        "image_bytes_per_galaxy": per_image,
        "decoded": len(blobs),
        "pil_images_per_s": pil_rate,
        "pil_images_per_cpu_s": pil_cpu_rate,
        "dali_cpu_images_per_s": dali_rate,
        "dali_cpu_images_per_cpu_s": dali_cpu_rate,
        "mean_abs_error_255": float(error.mean()),
        "max_abs_error_255": int(error.max()),
        "exact": bool(error.max() == 0),
        "max_dali_vs_pil_255": int(decoders.max()),
    }


def machine():
    import nvidia.dali
    import PIL
    from PIL import features

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "pillow": PIL.__version__,
        "openjpeg": features.version("jpg_2000"),
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "dali": nvidia.dali.__version__,
    }


def table(results):
    """Markdown table; decode rates as images/s of wall time (images per CPU second), ratios
    to png of the CPU-second rates."""
    lines = [
        "| size | format | bytes/galaxy (tar) | image bytes | vs png | Pillow img/s | vs png | DALI-CPU img/s | vs png "
        "| mean abs error /255 | DALI vs Pillow |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, rows in results.items():
        base = next(r for r in rows if r["format"] == "png")
        for r in rows:
            name = r["format"] + (f" q{r['jpeg_quality']}" if r["jpeg_quality"] else " (lossless)")
            pil, dali = r["pil_images_per_cpu_s"], r["dali_cpu_images_per_cpu_s"]
            lines.append(
                f"| {size} px | {name} | {r['bytes_per_galaxy']:.0f} | {r['image_bytes_per_galaxy']:.0f} | "
                f"{r['bytes_per_galaxy'] / base['bytes_per_galaxy']:.2f} | {r['pil_images_per_s']:.0f} ({pil:.0f}) | "
                f"{pil / base['pil_images_per_cpu_s']:.2f} | {r['dali_cpu_images_per_s']:.0f} ({dali:.0f}) | "
                f"{dali / base['dali_cpu_images_per_cpu_s']:.2f} | "
                f"{'0 (exact)' if r['exact'] else format(r['mean_abs_error_255'], '.2f')} | "
                f"{r['max_dali_vs_pil_255']} |"
            )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="image sizes to measure (px)")
    p.add_argument("--galaxies", type=int, default=400, help="galaxies rendered for sizes other than 64 px")
    p.add_argument("--qualities", type=int, nargs="+", default=[95, 75], help="JPEG qualities")
    p.add_argument("--decode", type=int, default=1000, help="images decoded per pass (train split)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    p.add_argument("--batch", type=int, default=50, help="DALI batch size")
    p.add_argument("--workers", type=int, default=2, help="GalSim rendering processes")
    p.add_argument(
        "--cache", type=Path, default=ROOT / "data" / "benchmarks" / "formats", help="catalogs and shards (git-ignored)"
    )
    p.add_argument("--out", type=Path, default=Path("formats.json"), help="JSON results")
    args = p.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    formats = [("png", None), ("jp2", None)] + [("jpeg", q) for q in args.qualities]
    load_before = os.getloadavg()
    results = {}
    for size in args.sizes:
        catalog = catalog_for(size, args.galaxies, args.cache, args.workers)
        results[size] = []
        for fmt, quality in formats:
            row = measure(catalog, fmt, quality, args.cache, args.decode, args.repeats, args.batch)
            row["catalog"] = str(catalog)
            results[size].append(row)
            print(f"{size} px {fmt} {quality or ''}: {json.dumps({k: row[k] for k in list(row)[4:]})}", flush=True)
    record = {
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=1))
    print(table(results))
    print(f"load average before {load_before[0]:.2f}, after {record['load_average_after'][0]:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
