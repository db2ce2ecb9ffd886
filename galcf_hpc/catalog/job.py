"""``galcf-hpc catalog run``: prediction, hidden vector and counterfactuals towards every
target class for every galaxy of a catalog, as an MPI batch job (one rank per GPU).

The input is cut into fixed-size work units (contiguous ranges of its order). Rank 0 hands
them out on request from a small server thread while it works through units itself, so a
slow or late rank takes fewer units instead of holding the job back. Each unit becomes
``parts/unit-NNNNNN.h5``, written under a temporary name and renamed when complete: a part
that exists is done, and a rerun with the same arguments computes only the missing ones.
At the end rank 0 writes ``catalog.h5`` (virtual datasets over the parts). Messages between
ranks are plain integer buffers (no pickle).
"""

import json
import logging
import os
import signal
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import dump_config
from ..data.classes import CLASS_NAMES, NUM_CLASSES, class_index
from ..errors import ConfigError, DataError, GalcfError
from ..explain.metrics import msd, ssim
from ..explain.run import load_run
from ..fileio import file_sha256, write_json
from ..loaders.augment import augment_batch
from ..train.checkpoint import latest_checkpoint
from ..train.distributed import resolve_device
from . import store
from .source import open_source

log = logging.getLogger("galcf_hpc")

IMAGE_DTYPES = ("uint8", "float16")
_ASK, _ANSWER = 11, 12
_POLL_S = 0.002
# run.json entries that must match for a rerun to continue in the same output directory
_IDENTITY = ("format", "checkpoint_sha256", "input", "input_fingerprint", "num_galaxies", "unit_size",
             "targets", "image_dtype")


class RankStopped(GalcfError):
    """Raised on ranks other than 0 when rank 0 refused the job (rank 0 prints why)."""


def parse_targets(text):
    """``all``, or comma-separated class names or numbers -> sorted class indices."""
    if text in (None, "", "all"):
        return list(range(NUM_CLASSES))
    try:
        targets = sorted({class_index(t.strip()) for t in text.split(",") if t.strip()})
    except ValueError as exc:
        raise ConfigError(f"--targets: {exc}") from None
    if not targets:
        raise ConfigError("--targets: no class given; use all, names or numbers separated by commas")
    return targets


def resolve_checkpoint(path):
    """A checkpoint file, or the newest checkpoint of a run directory."""
    path = Path(path)
    found = latest_checkpoint(path) if path.is_dir() else path
    if found is None:
        raise DataError(f"{path}: run directory has no checkpoints/step-*.pt; pass a checkpoint file or "
                        "a trained run directory")
    return found


@torch.no_grad()
def explain_batch(model, x, targets, margin, chunk):
    """Classification and counterfactuals of a batch x towards every target.

    Returns float/int tensors: pred [B], distance [B, C], h [B, D], image [B, T, 3, R, R]
    (x_cf, or the reconstruction x~ where target == pred), validity [B, T] (-1 where
    target == pred), msd/ssim [B, T] of x_cf vs x~ (NaN where target == pred).
    Counterfactuals are decoded ``chunk`` at a time, the memory of one batch.
    """
    pred, _, h, z = model.classify(x)
    recon = model.decoder(z).float()
    h = h.float()
    tgt = torch.as_tensor(targets, device=x.device)
    b, t = len(pred), len(targets)
    image = recon[:, None].repeat(1, t, 1, 1, 1)
    validity = torch.full((b, t), -1, dtype=torch.int8, device=x.device)
    msd_ = torch.full((b, t), float("nan"), device=x.device)
    ssim_ = torch.full((b, t), float("nan"), device=x.device)
    rows, cols = (pred[:, None] != tgt[None]).nonzero(as_tuple=True)
    for s in range(0, len(rows), chunk):
        r, c = rows[s:s + chunk], cols[s:s + chunk]
        x_cf, _ = model.counterfactual(z[r], h[r], pred[r], tgt[c], margin)
        x_cf = x_cf.float()
        image[r, c] = x_cf
        validity[r, c] = (model.classify(x_cf)[0] == tgt[c]).to(torch.int8)
        msd_[r, c] = msd(x_cf, recon[r]).float()
        ssim_[r, c] = ssim(x_cf, recon[r]).float()
    distance = (h[:, None] - model.means.float()[None]).norm(dim=-1)
    return {"pred": pred, "distance": distance, "h": h, "image": image, "validity": validity,
            "msd": msd_, "ssim": ssim_}


def _to_numpy(out, image_dtype):
    image = out["image"].clamp(0, 1)
    image = (image * 255).round().to(torch.uint8) if image_dtype == "uint8" else image.to(torch.float16)
    arrays = {k: v.cpu().numpy() for k, v in out.items() if k != "image"}
    arrays["image"] = image.cpu().numpy()
    arrays["pred"] = arrays["pred"].astype(np.int16)
    return arrays


# ---------------------------------------------------------------------------------------
# Preparation (rank 0): everything that can fail on bad input, before any output is touched


def _prepare(checkpoint, input_path, out_dir, targets, unit_size, image_dtype, device):
    resolve_device(device, 0, option="--device")
    if unit_size < 1:
        raise ConfigError(f"--unit-size must be at least 1, got {unit_size}")
    if image_dtype not in IMAGE_DTYPES:
        raise ConfigError(f"--image-dtype must be one of {', '.join(IMAGE_DTYPES)}, got {image_dtype!r}")
    ckpt = resolve_checkpoint(checkpoint)
    model, cfg, ckpt = load_run(ckpt.parent, ckpt, "cpu")
    source = open_source(input_path)
    out_dir = Path(out_dir)
    run = {
        "format": store.FORMAT, "version": __version__,
        "checkpoint": str(Path(ckpt).resolve()), "checkpoint_sha256": file_sha256(ckpt),
        "input": str(Path(input_path).resolve()), "input_fingerprint": source.fingerprint,
        "num_galaxies": source.n, "unit_size": unit_size, "targets": targets, "image_dtype": image_dtype,
        "key_length": max(len(k) for k in source.keys),
    }
    run_json = out_dir / "run.json"
    if run_json.is_file():
        try:
            old = json.loads(run_json.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{run_json} cannot be read ({exc}); pass a new --out") from None
        diff = [f"{k}: {old.get(k)!r} there, {run[k]!r} now" for k in _IDENTITY if old.get(k) != run[k]]
        if diff:
            raise DataError(f"{out_dir} holds the output of another catalog run ({'; '.join(diff)}); "
                            "pass a new --out, or delete that directory to start over")
    elif (out_dir / store.PARTS).exists() or (out_dir / store.CATALOG).exists():
        raise DataError(f"{out_dir} has {store.PARTS}/ or {store.CATALOG} but no run.json, so it cannot be "
                        "resumed safely; pass a new --out")
    else:
        write_json(run_json, run)
    parts = out_dir / store.PARTS
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".unit-*.tmp"):  # left by a killed run; its unit is recomputed
        stale.unlink(missing_ok=True)
    units = store.work_units(source.n, unit_size)
    todo = [u for u in range(len(units)) if not (parts / store.part_name(u)).is_file()]
    plan = {**run, "out_dir": str(out_dir), "checkpoint_path": str(ckpt), "todo": todo,
            "skipped": len(units) - len(todo)}
    return plan, model, cfg, source


# ---------------------------------------------------------------------------------------
# Work units: a local queue, served to the other ranks by a thread on rank 0


class _Queue:
    def __init__(self, todo):
        self._todo, self._lock = deque(todo), threading.Lock()

    def next(self):
        with self._lock:
            return self._todo.popleft() if self._todo else None


def _serve(comm, queue, workers):
    """Answer each rank's requests until every one has been told there is no work left."""
    from mpi4py import MPI

    status, buf = MPI.Status(), np.zeros(1, np.int64)
    while workers:
        if not comm.Iprobe(source=MPI.ANY_SOURCE, tag=_ASK, status=status):
            time.sleep(_POLL_S)
            continue
        comm.Recv(buf, source=status.Get_source(), tag=_ASK)
        unit = queue.next()
        comm.Send(np.array([-1 if unit is None else unit], np.int64), dest=status.Get_source(), tag=_ANSWER)
        workers -= unit is None


def _wait(request):
    # Sleep between tests: a blocking MPI wait spins a core that a CPU rank needs.
    while not request.Test():
        time.sleep(_POLL_S)


def _ask(comm):
    buf = np.zeros(1, np.int64)
    comm.Send(buf, dest=0, tag=_ASK)
    _wait(comm.Irecv(buf, source=0, tag=_ANSWER))
    return None if buf[0] < 0 else int(buf[0])


def _bcast_json(comm, obj):
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if comm.Get_rank() == 0 else None
    size = np.array([0 if data is None else len(data)], np.int64)
    comm.Bcast(size, root=0)
    if data is None:
        data = np.empty(size[0], np.uint8)
    comm.Bcast(data, root=0)
    return json.loads(data.tobytes())


# ---------------------------------------------------------------------------------------
# The job


def _cpu_threads(local_size):
    cpus = len(os.sched_getaffinity(0))
    # A launcher that binds each rank to its own cores (srun --cpus-per-task) already split
    # them; otherwise the ranks of a node share all of its cores.
    return cpus if cpus < (os.cpu_count() or cpus) else max(1, cpus // local_size)


def _run_unit(ctx, unit, start, stop):
    fields, dev = ctx["fields"], ctx["device"]
    attrs = {"unit": unit, "start": start, "stop": stop, "checkpoint_sha256": ctx["plan"]["checkpoint_sha256"],
             "device": str(dev), "version": __version__}
    path = Path(ctx["plan"]["out_dir"]) / store.PARTS / store.part_name(unit)
    bs = ctx["cfg"].explain.batch_size
    with store.part_writer(path, stop - start, fields, attrs) as write:
        for b0 in range(start, stop, bs):
            data = ctx["source"].read(b0, min(b0 + bs, stop))
            x = augment_batch(torch.from_numpy(data["images"]), ctx["cfg"].data.image_size,
                              ctx["cfg"].data.crop_fraction).to(dev)
            with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
                out = explain_batch(ctx["model"], x, ctx["plan"]["targets"], ctx["cfg"].explain.margin, bs)
            write(b0 - start, {"key": np.asarray(data["keys"], dtype=fields["key"][1]), "ra": data["ra"],
                               "dec": data["dec"], "label": data["labels"].astype(np.int16),
                               **_to_numpy(out, ctx["plan"]["image_dtype"])})
            if ctx["kill_at_unit"] == unit:  # fault injection for the restart test: die mid-unit
                os.kill(os.getpid(), signal.SIGKILL)


def _catalog_attrs(plan, cfg, fields):
    return {**{k: plan[k] for k in ("format", "version", "checkpoint", "checkpoint_sha256", "input",
                                    "input_fingerprint", "num_galaxies", "unit_size", "image_dtype")},
            "num_units": len(store.work_units(plan["num_galaxies"], plan["unit_size"])),
            "targets": np.asarray(plan["targets"], np.int16),
            "target_names": [CLASS_NAMES[t] for t in plan["targets"]],
            "class_names": list(CLASS_NAMES), "config": dump_config(cfg),
            "image_size": cfg.data.image_size, "crop_fraction": cfg.data.crop_fraction,
            "margin": cfg.explain.margin, "fields": list(fields)}


def run_catalog(checkpoint, input_path, out_dir, targets=None, unit_size=256, device="auto",
                image_dtype="uint8", comm=None, kill_at_unit=None):
    """Run (or resume) the catalog job on this rank; ``comm`` is an MPI communicator or None
    for a single process. Returns a summary dict (rank 0: with per-rank statistics)."""
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    targets = parse_targets(targets) if not isinstance(targets, list) else targets
    local_rank, local_size = 0, 1
    if comm:
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, local_size = local.Get_rank(), local.Get_size()
        local.Free()

    plan, error = None, None
    if rank == 0:
        try:
            plan, model, cfg, source = _prepare(checkpoint, input_path, out_dir, targets, unit_size, image_dtype,
                                               device)
        except Exception as exc:  # bad input, or a bug: either way the other ranks must hear of it
            error = exc
    if comm:
        shared = _bcast_json(comm, {"error": str(error)} if error else plan)
        if rank:
            if "error" in shared:
                raise RankStopped(shared["error"])
            plan = shared
    if error:
        raise error
    try:
        dev = resolve_device(device, local_rank, option="--device")
        if rank:
            model, cfg, _ = load_run(None, plan["checkpoint_path"], "cpu")
            source = open_source(plan["input"])
        if dev.type == "cpu":
            torch.set_num_threads(_cpu_threads(local_size))
        units = store.work_units(plan["num_galaxies"], plan["unit_size"])
        fields = store.schema(plan["key_length"], NUM_CLASSES, model.means.shape[1], len(plan["targets"]),
                              cfg.data.image_size, plan["image_dtype"])
        ctx = {"plan": plan, "cfg": cfg, "model": model.to(dev), "source": source, "device": dev,
               "fields": fields, "kill_at_unit": kill_at_unit}
        if rank == 0:
            log.info("catalog: %d galaxies in %d units of %d, %d finished before (skipped), %d to do on %d rank(s)",
                     plan["num_galaxies"], len(units), plan["unit_size"], plan["skipped"], len(plan["todo"]), size)
        queue = _Queue(plan["todo"]) if rank == 0 else None
        server = None
        if rank == 0 and size > 1:
            server = threading.Thread(target=_serve, args=(comm, queue, size - 1), daemon=True)
            server.start()
        t0 = time.monotonic()
        done_units = done_galaxies = 0
        while (unit := queue.next() if rank == 0 else _ask(comm)) is not None:
            t_unit = time.monotonic()
            start, stop = units[unit]
            _run_unit(ctx, unit, start, stop)
            done_units, done_galaxies = done_units + 1, done_galaxies + stop - start
            log.info("rank %d: unit %d of %d (galaxies %d-%d) done, %.1f galaxies/s", rank, unit, len(units),
                     start, stop - 1, (stop - start) / (time.monotonic() - t_unit))
        busy = time.monotonic() - t0
        if server:
            server.join()
        source.close()
    except BaseException as exc:
        if comm and size > 1 and not isinstance(exc, KeyboardInterrupt):
            # One rank failing cannot finish the job; stop all of them, a rerun resumes.
            what = str(exc) if isinstance(exc, GalcfError) else traceback.format_exc()
            print(f"galcf-hpc: error: rank {rank}: {what}\nstopping every rank; rerun to resume", flush=True)
            comm.Abort(2)
        raise
    stats = np.array([done_units, done_galaxies, busy], np.float64)
    if comm:
        _wait(comm.Ibarrier())
        everyone = np.zeros((size, 3)) if rank == 0 else None
        comm.Gather(stats, everyone, root=0)
        wall = time.monotonic() - t0
    else:
        everyone, wall = stats[None], busy
    if rank:
        return {"rank": rank, "units": done_units}
    store.write_catalog_file(plan["out_dir"], units, fields, _catalog_attrs(plan, cfg, fields))
    summary = {
        "num_galaxies": plan["num_galaxies"], "num_units": len(units), "skipped_units": plan["skipped"],
        "computed_units": len(plan["todo"]), "ranks": size, "device": str(dev), "work_seconds": wall,
        "per_rank": [{"rank": r, "units": int(u), "galaxies": int(g), "seconds": s,
                      "galaxies_per_s": g / s if s > 0 else 0.0} for r, (u, g, s) in enumerate(everyone)],
        "catalog": str(Path(plan["out_dir"]) / store.CATALOG),
    }
    write_json(Path(plan["out_dir"]) / "summary.json", summary)
    return summary


def verify_catalog(out_dir):
    """Check a finished catalog directory; returns a summary dict, raises DataError listing
    every problem found."""
    import h5py

    out_dir = Path(out_dir)
    attrs = store.read_attrs(out_dir / store.CATALOG)
    problems, notes = [], []
    try:
        run = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError) as exc:
        run = {}
        problems.append(f"{out_dir / 'run.json'} cannot be read ({exc})")
    for k in ("checkpoint_sha256", "input", "num_galaxies", "unit_size", "image_dtype"):
        if run and run.get(k) != (attrs[k].item() if hasattr(attrs[k], "item") else attrs[k]):
            problems.append(f"attribute '{k}' of catalog.h5 is {attrs[k]!r}, run.json says {run.get(k)!r}")
    n, targets = int(attrs["num_galaxies"]), [int(t) for t in attrs["targets"]]
    units = store.work_units(n, int(attrs["unit_size"]))
    with h5py.File(out_dir / store.CATALOG, "r") as f:
        fields = store.schema(f["key"].dtype.itemsize, NUM_CLASSES, f["h"].shape[1], len(targets),
                              int(attrs["image_size"]), str(attrs["image_dtype"]))
        problems += store.check_parts(out_dir, units, fields)
        found, keys = store.check_values(f, fields, targets)
        problems += found
    if Path(attrs["input"]).exists():
        source = open_source(attrs["input"])
        if source.keys != keys:
            missing = sorted(set(source.keys) - set(keys))
            problems.append(f"keys differ from the input {attrs['input']} ({len(missing)} input keys absent"
                            f"{', e.g. ' + missing[0] if missing else ''}; or in another order)")
        source.close()
    else:
        notes.append(f"input {attrs['input']} no longer exists; keys checked for uniqueness only")
    ckpt = Path(attrs["checkpoint"])
    if ckpt.is_file():
        if file_sha256(ckpt) != attrs["checkpoint_sha256"]:
            problems.append(f"checkpoint {ckpt} has changed since the catalog was made (sha256 differs); "
                            "rerun into a new --out to match the current checkpoint")
    else:
        notes.append(f"checkpoint {ckpt} no longer exists; its sha256 was not re-checked")
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataError(f"{out_dir}: catalog verification failed:\n  {shown}\nRerun `galcf-hpc catalog run` with "
                        "the same arguments to recompute missing parts")
    return {"num_galaxies": n, "num_units": len(units), "targets": targets, "notes": notes}
