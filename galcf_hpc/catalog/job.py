"""``galcf-hpc catalog run``: prediction, latents and counterfactuals towards every target
class for every galaxy of a catalog, as an MPI batch job (one rank per GPU). The pass is the
shared one (:func:`galcf_hpc.model.evaluation.explain_batch`), with validity by the model
and by every judge trained next to the checkpoint's run (RUN/judges/<name>/model.pt).

The input is cut into fixed-size work units (contiguous ranges of its order). Rank 0 hands
them out on request from a small server thread while it works through units itself, so a
slow or late rank takes fewer units instead of holding the job back. That thread needs an
MPI with ``MPI_THREAD_MULTIPLE`` (checked with ``MPI.Query_thread()``); with a lower thread
level rank 0 hands out units from its main thread and computes none. Each unit becomes
``parts/unit-NNNNNN.h5``, written under a temporary name and renamed when complete. A rerun
with the same arguments skips the parts that are finished parts of this very run (checked
at the start: they open, have their unit's rows and the schema, and record this run's
checkpoint, judges, targets and input), moves every other file aside
(``unit-NNNNNN.h5.rejected-<reason>``) and computes the rest. At the end rank 0 writes
``catalog.h5`` (virtual datasets over the parts). Messages between ranks are plain integer
buffers (no pickle).
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
from ..data.classes import CLASS_NAMES, NUM_CLASSES, parse_class_list
from ..device import inference_precision, resolve_device
from ..errors import DataError, GalcfError, UsageError
from ..explain.run import load_run
from ..fileio import DirLock, file_sha256, write_json
from ..judges import judges_dir, load_judge, load_judges
from ..loaders.augment import augment_batch
from ..metrics import class_probabilities, mislabel_score, top2_margin
from ..model.evaluation import explain_batch
from ..progress import Progress
from ..train.checkpoint import latest_checkpoint
from . import store
from .render import inference_context, inference_model, thumbnails, to_uint8
from .source import open_source

log = logging.getLogger("galcf_hpc")

IMAGE_DTYPES = ("uint8", "float16")
_ASK, _ANSWER = 11, 12
_POLL_S = 0.002
# run.json entries that must match for a rerun to continue in the same output directory
_IDENTITY = (
    "format",
    "checkpoint_sha256",
    "judges",
    "input",
    "input_fingerprint",
    "num_galaxies",
    "unit_size",
    "targets",
    "images",
    "image_dtype",
    "decode_batch",
)
# the change metrics a catalog stores (explain_batch computes only these)
_METRICS = ("msd_rec", "ssim_rec", "luminance_share")


class RankStopped(GalcfError):
    """Raised on ranks other than 0 when rank 0 refused the job (rank 0 prints why); they
    exit with rank 0's exit code."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def parse_targets(text):
    """``all``, or comma-separated class names or numbers -> sorted class indices."""
    try:
        return parse_class_list(text)
    except ValueError as exc:
        raise UsageError(f"--targets: {exc}") from None


def resolve_checkpoint(path):
    """A checkpoint file, or the newest checkpoint of a run directory."""
    path = Path(path)
    found = latest_checkpoint(path) if path.is_dir() else path
    if found is None:
        raise DataError(
            f"{path}: run directory has no checkpoints/step-*.pt; pass a checkpoint file or a trained run directory"
        )
    return found


def _images(out, plan, image_size, n):
    """The image field of the first ``n`` galaxies of an ExplainedBatch, by ``--images``."""
    if plan["images"] == "full":
        image = out.cf_images[:n]
        return {"image": to_uint8(image) if plan["image_dtype"] == "uint8" else image.clamp(0, 1).to(torch.float16)}
    if plan["images"] == "thumbnails":
        return {"thumbnail": thumbnails(out.cf_images[:n], store.thumbnail_size(image_size))}
    return {}


def _to_numpy(out, distance, labels, plan, image_size, n):
    """The catalog fields of the first ``n`` galaxies of an ExplainedBatch (the rest is padding)."""
    prob = class_probabilities(out.logits[:n])
    arrays = {
        "pred": out.pred[:n].to(torch.int16),
        "prob": prob,
        "margin": top2_margin(prob),
        "mislabel_score": mislabel_score(distance[:n], labels),
        "distance": distance[:n],
        "h": out.h[:n],
        "z": out.z[:n],
        **_images(out, plan, image_size, n),
        "validity": out.valid["model"][:n],
        **{store.validity_field(name): v[:n] for name, v in out.valid.items() if name != "model"},
        "msd": out.change["msd_rec"][:n],
        "ssim": out.change["ssim_rec"][:n],
        "luminance_share": out.change["luminance_share"][:n],
    }
    return {k: v.cpu().numpy() for k, v in arrays.items()}


def _schema(plan, model, cfg):
    """The catalog's fields for a run ``plan`` (run.json's entries) of ``model``."""
    return store.schema(
        plan["key_length"],
        NUM_CLASSES,
        model.means.shape[1],
        cfg.model.z_dim,
        len(plan["targets"]),
        cfg.data.image_size,
        plan["image_dtype"],
        list(plan["judges"]),
        plan["images"],
    )


# ---------------------------------------------------------------------------------------
# Preparation (rank 0): everything that can fail on bad input, before any output is touched


def _prepare(checkpoint, input_path, out_dir, targets, unit_size, image_dtype, images, device, ranks):
    first = resolve_device(device, 0, option="--device")
    if unit_size is not None and unit_size < 1:
        raise UsageError(f"--unit-size must be at least 1, got {unit_size}")
    if image_dtype not in IMAGE_DTYPES:
        raise UsageError(f"--image-dtype must be one of {', '.join(IMAGE_DTYPES)}, got {image_dtype!r}")
    if images not in ("auto", *store.IMAGE_MODES):
        raise UsageError(f"--images must be one of auto, {', '.join(store.IMAGE_MODES)}, got {images!r}")
    ckpt = resolve_checkpoint(checkpoint)
    model, cfg, ckpt = load_run(ckpt.parent, ckpt, "cpu")
    judges, judge_shas = _find_judges(ckpt)
    judge_dir = judges_dir(judges_run_dir(ckpt))
    source = open_source(input_path)
    if images == "auto":
        images = store.default_images(source.n, len(targets), cfg.data.image_size)
        log.info("catalog: --images auto: %s for %d galaxies (see docs/catalog.md)", images, source.n)
    out_dir = Path(out_dir)
    run = {
        "format": store.FORMAT,
        "version": __version__,
        "checkpoint": str(Path(ckpt).resolve()),
        "checkpoint_sha256": file_sha256(ckpt),
        "judges": judge_shas,
        "judges_dir": str(judge_dir),
        "input": str(Path(input_path).resolve()),
        "input_fingerprint": source.fingerprint,
        "num_galaxies": source.n,
        "unit_size": unit_size,
        "targets": targets,
        "images": images,
        "image_dtype": image_dtype,
        # every decode of the job runs on exactly this many latents: what makes
        # `catalog render` reproduce the images bit for bit (model.evaluation.padded_rows)
        "decode_batch": cfg.explain.batch_size,
        "key_length": max(len(k) for k in source.keys),
    }
    if unit_size is None:
        run["unit_size"] = store.default_unit_size(source.n, ranks, _schema(run, model, cfg))
        log.info("catalog: units of %d galaxies for %d galaxies on %d rank(s)", run["unit_size"], source.n, ranks)
    run_json = out_dir / "run.json"
    if run_json.is_file():
        try:
            old = json.loads(run_json.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{run_json} cannot be read ({exc}); pass a new --out") from None
        if unit_size is None:  # a resumed run keeps its units, whatever the number of ranks now
            run["unit_size"] = old.get("unit_size")
        diff = [f"{k}: {old.get(k)!r} there, {run[k]!r} now" for k in _IDENTITY if old.get(k) != run[k]]
        if diff:
            raise DataError(
                f"{out_dir} holds the output of another catalog run ({'; '.join(diff)}); "
                "pass a new --out, or delete that directory to start over"
            )
    elif (out_dir / store.PARTS).exists() or (out_dir / store.CATALOG).exists():
        raise DataError(
            f"{out_dir} has {store.PARTS}/ or {store.CATALOG} but no run.json, so it cannot be "
            "resumed safely; pass a new --out"
        )
    else:
        write_json(run_json, run)
    parts = out_dir / store.PARTS
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".unit-*.tmp"):  # left by a killed run; its unit is recomputed
        stale.unlink(missing_ok=True)
    units = store.work_units(source.n, run["unit_size"])
    # the precision every unit is computed at (not part of run.json: a resumed run may change
    # it, and then recomputes every part of the other precision, so the catalog is one function)
    precision = inference_precision(first, cfg.train)
    todo, rejected = _check_done(parts, units, _schema(run, model, cfg), {**run, "precision": precision})
    plan = {
        **run,
        "precision": precision,
        "out_dir": str(out_dir),
        "checkpoint_path": str(ckpt),
        "todo": todo,
        "skipped": len(units) - len(todo),
        "rejected": rejected,
    }
    return plan, model, judges, cfg, source


def _check_done(parts, units, fields, run):
    """(units to compute, names the rejected parts were moved to). A part file counts as
    done only if it is a finished part of this run (:func:`store.part_problem`: attributes
    and shapes, no values, so this stays cheap for thousands of parts); any other file under
    a part's name is moved aside, never deleted, and its unit computed again. The sha256 of
    a part's rows of the input is compared by ``catalog verify`` only: that needs the whole
    input read again."""
    todo, rejected = [], []
    for unit, (start, stop) in enumerate(units):
        path = parts / store.part_name(unit)
        if not (path.exists() or path.is_symlink()):
            todo.append(unit)
            continue
        bad = store.part_problem(path, unit, start, stop, fields, run)
        if bad:
            aside = store.reject_part(path, bad[0])
            log.warning("catalog: %s %s; moved aside to %s, unit %d is computed again", path, bad[1], aside.name, unit)
            rejected.append(aside.name)
            todo.append(unit)
    return todo, rejected


def judges_run_dir(checkpoint):
    """The run directory whose ``judges/`` belong to a checkpoint RUN/checkpoints/step-*.pt."""
    return Path(checkpoint).absolute().parent.parent


def _judge_path(judge_dir, name):
    return Path(judge_dir) / name / "model.pt"


def _find_judges(checkpoint):
    """({name: judge on the CPU}, {name: sha256 of its model.pt}) of every judge trained next
    to the checkpoint's run; a warning when some or all are missing."""
    run_dir = judges_run_dir(checkpoint)
    judges, note = load_judges(run_dir, "cpu")
    if note:
        log.warning(
            "catalog: %s",
            note
            if judges
            else f"no judges next to the checkpoint (looked in "
            f"{judges_dir(run_dir)}): the catalog gets validity by the model only, which is necessary "
            f"but never sufficient; {note}",
        )
    return judges, {name: file_sha256(_judge_path(judges_dir(run_dir), name)) for name in judges}


def _load_judges_again(plan, device):
    """The judges rank 0 found, on another rank; refused if a file changed in between."""
    judges = {}
    for name, sha in plan["judges"].items():
        path = _judge_path(plan["judges_dir"], name)
        judges[name], _ = load_judge(path, device)
        if file_sha256(path) != sha:
            raise DataError(f"judge {path} changed while the catalog job started (sha256 differs); rerun")
    return judges


# ---------------------------------------------------------------------------------------
# Work units: a local queue, served to the other ranks by a thread on rank 0


class _Queue:
    """The units still to do, handed out on request. A rank that asks again has finished
    the unit it had: ``progress(galaxies done)`` counts it (a bar with ETA on a terminal,
    periodic log lines in a batch log)."""

    def __init__(self, todo, sizes=None, progress=None):
        self._todo, self._lock = deque(todo), threading.Lock()
        self._sizes, self._progress, self._working, self._done = sizes or {}, progress, {}, 0

    def next(self, rank=0):
        with self._lock:
            finished = self._working.pop(rank, None)
            if finished is not None and self._progress is not None:
                self._done += self._sizes.get(finished, 0)
                self._progress(self._done)
            unit = self._todo.popleft() if self._todo else None
            if unit is not None:
                self._working[rank] = unit
            return unit


def _serve(comm, queue, workers):
    """Answer each rank's requests until every one has been told there is no work left."""
    from mpi4py import MPI

    status, buf = MPI.Status(), np.zeros(1, np.int64)
    while workers:
        if not comm.Iprobe(source=MPI.ANY_SOURCE, tag=_ASK, status=status):
            time.sleep(_POLL_S)
            continue
        comm.Recv(buf, source=status.Get_source(), tag=_ASK)
        unit = queue.next(status.Get_source())
        comm.Send(np.array([-1 if unit is None else unit], np.int64), dest=status.Get_source(), tag=_ANSWER)
        workers -= unit is None


def _thread_level():
    """MPI's thread level by name. Only ``multiple`` lets a thread besides the main one call
    MPI while the main one also does (a failing rank calls MPI_Abort from the main thread
    while the server thread probes)."""
    from mpi4py import MPI

    names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled", MPI.THREAD_SERIALIZED: "serialized"}
    return names.get(MPI.Query_thread(), "multiple")


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
    fields, dev, cfg = ctx["fields"], ctx["device"], ctx["cfg"]
    # The rows' sha256 reads the unit's input once more (raw bytes, no decoding), which is
    # small next to the counterfactual pass; the reads below then come from the page cache.
    attrs = store.part_attrs(
        unit,
        start,
        stop,
        ctx["plan"],
        ctx["source"].unit_sha256(start, stop),
        device=str(dev),
        version=__version__,
    )
    path = Path(ctx["plan"]["out_dir"]) / store.PARTS / store.part_name(unit)
    bs = cfg.explain.batch_size
    with store.part_writer(path, stop - start, fields, attrs) as write:
        for b0 in range(start, stop, bs):
            data = ctx["source"].read(b0, min(b0 + bs, stop))
            n = len(data["keys"])
            # uint8 to the device first (4x less to copy than float), then crop and resize there
            raw = torch.from_numpy(data["images"]).to(dev)
            if dev.type == "cuda" and n < bs:
                # fixed shapes for cudnn.benchmark: pad the last batch of a unit with copies of
                # its last galaxy, whose results are dropped
                raw = torch.cat([raw, raw[-1:].expand(bs - n, *raw.shape[1:])])
            x = augment_batch(raw, cfg.data.image_size, cfg.data.crop_fraction)
            x = x.contiguous(memory_format=torch.channels_last)
            # every galaxy's counterfactuals towards all targets in one pass: batched decodes
            # and re-encodes of exactly decode_batch latents (padded), judges in fp32
            with inference_context(dev, cfg.train):
                out = explain_batch(
                    ctx["model"],
                    x,
                    ctx["plan"]["targets"],
                    cfg.explain.margin,
                    ctx["judges"],
                    cfg.explain.background_fraction,
                    keep_images=ctx["plan"]["images"] != "none",
                    chunk=ctx["plan"]["decode_batch"],
                    placement=cfg.explain.placement,
                    metrics=_METRICS,
                    pad=True,
                    judge_inputs=False,  # the catalog stores the judges' verdicts on x_cf only
                )
            distance = (out.h[:, None] - ctx["means"][None]).norm(dim=-1)
            write(
                b0 - start,
                {
                    "key": np.asarray(data["keys"], dtype=fields["key"][1]),
                    "ra": data["ra"],
                    "dec": data["dec"],
                    "label": data["labels"].astype(np.int16),
                    **_to_numpy(out, distance, torch.from_numpy(data["labels"]), ctx["plan"], cfg.data.image_size, n),
                },
            )
            if ctx["kill_at_unit"] == unit:  # fault injection for the restart test: die mid-unit
                os.kill(os.getpid(), signal.SIGKILL)


def _catalog_attrs(plan, cfg, fields):
    return {
        **{
            k: plan[k]
            for k in (
                "format",
                "version",
                "checkpoint",
                "checkpoint_sha256",
                "judges_dir",
                "input",
                "input_fingerprint",
                "num_galaxies",
                "unit_size",
                "images",
                "image_dtype",
                "decode_batch",
                "precision",
            )
        },
        "num_units": len(store.work_units(plan["num_galaxies"], plan["unit_size"])),
        "targets": np.asarray(plan["targets"], np.int16),
        "target_names": [CLASS_NAMES[t] for t in plan["targets"]],
        "class_names": list(CLASS_NAMES),
        "config": dump_config(cfg),
        "image_size": cfg.data.image_size,
        "crop_fraction": cfg.data.crop_fraction,
        "margin": cfg.explain.margin,
        "placement": cfg.explain.placement,
        "judge_names": _strings(plan["judges"]),
        "judge_sha256": _strings(plan["judges"].values()),
        "fields": list(fields),
    }


def _strings(values):
    # an explicit string dtype, so that an empty list is an empty list of strings in HDF5 too
    import h5py

    return np.asarray(list(values), dtype=h5py.string_dtype())


def run_catalog(
    checkpoint,
    input_path,
    out_dir,
    targets=None,
    unit_size=None,
    device="auto",
    image_dtype="uint8",
    comm=None,
    kill_at_unit=None,
    images="auto",
):
    """Run (or resume) the catalog job on this rank; ``comm`` is an MPI communicator or None
    for a single process. Returns a summary dict (rank 0: with per-rank statistics). Rank 0
    holds ``OUT/.lock`` while the job runs: a second job into the same directory is refused."""
    lock = DirLock(out_dir) if (comm.Get_rank() if comm else 0) == 0 else None
    try:
        return _run_catalog(
            checkpoint, input_path, out_dir, targets, unit_size, device, image_dtype, images, comm, kill_at_unit, lock
        )
    finally:
        if lock is not None:
            lock.release()


def _run_catalog(
    checkpoint, input_path, out_dir, targets, unit_size, device, image_dtype, images, comm, kill_at_unit, lock
):
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
            holder = lock.acquire()
            if holder is not None:
                raise DataError(
                    f"{out_dir} is in use by another catalog job ({holder}, {lock.path}); wait for it, pass "
                    "another --out, or delete the lock file if that job has ended"
                )
            plan, model, judges, cfg, source = _prepare(
                checkpoint, input_path, out_dir, targets, unit_size, image_dtype, images, device, size
            )
        except Exception as exc:  # bad input, or a bug: either way the other ranks must hear of it
            error = exc
    if comm:
        shared = _bcast_json(comm, {"error": str(error), "code": getattr(error, "exit_code", 1)} if error else plan)
        if rank:
            if "error" in shared:
                raise RankStopped(shared["error"], shared["code"])
            plan = shared
    if error:
        raise error
    try:
        dev = resolve_device(device, local_rank, option="--device")
        if rank:
            model, cfg, _ = load_run(None, plan["checkpoint_path"], "cpu")
            judges = _load_judges_again(plan, "cpu")
            source = open_source(plan["input"])
        mine = inference_precision(dev, cfg.train)
        if mine != plan["precision"]:
            raise DataError(
                f"rank {rank} would compute in {mine} on {dev}, rank 0 planned every unit in {plan['precision']}: "
                "a catalog holds one precision; run every rank on the same kind of device (GPUs everywhere, or "
                "CPUs that all have, or all lack, native bf16)"
            )
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            torch.backends.cudnn.benchmark = True  # batches are padded to one shape (see _run_unit)
        else:
            torch.set_num_threads(_cpu_threads(local_size))
        units = store.work_units(plan["num_galaxies"], plan["unit_size"])
        fields = _schema(plan, model, cfg)
        model = inference_model(model, dev)
        ctx = {
            "plan": plan,
            "cfg": cfg,
            "model": model,
            "means": model.means.detach().float(),
            "judges": {name: inference_model(j, dev) for name, j in judges.items()},
            "source": source,
            "device": dev,
            "fields": fields,
            "kill_at_unit": kill_at_unit,
        }
        if rank == 0:
            log.info(
                "catalog: %d galaxies in %d units of %d, %d finished before (skipped), %d rejected (moved "
                "aside), %d to do on %d rank(s)",
                plan["num_galaxies"],
                len(units),
                plan["unit_size"],
                plan["skipped"],
                len(plan["rejected"]),
                len(plan["todo"]),
                size,
            )
        queue = None
        if rank == 0:
            sizes = {u: units[u][1] - units[u][0] for u in plan["todo"]}
            queue = _Queue(plan["todo"], sizes, Progress(max(1, sum(sizes.values())), "catalog galaxies"))
        server = None
        if rank == 0 and size > 1:
            level = _thread_level()
            if level == "multiple":
                server = threading.Thread(target=_serve, args=(comm, queue, size - 1), daemon=True)
                server.start()
            else:
                log.warning(
                    "catalog: the MPI library gives thread level %s, not MPI_THREAD_MULTIPLE, so no thread "
                    "may call MPI next to the main one: rank 0 only hands out units and computes none "
                    "(use an MPI built with thread support to let it compute too)",
                    level,
                )
                _serve(comm, queue, size - 1)  # returns when every rank was told there is no work left
        t0 = time.monotonic()
        done_units = done_galaxies = 0
        while (unit := queue.next() if rank == 0 else _ask(comm)) is not None:
            t_unit = time.monotonic()
            start, stop = units[unit]
            _run_unit(ctx, unit, start, stop)
            done_units, done_galaxies = done_units + 1, done_galaxies + stop - start
            log.info(
                "rank %d: unit %d of %d (galaxies %d-%d) done, %.1f galaxies/s",
                rank,
                unit,
                len(units),
                start,
                stop - 1,
                (stop - start) / (time.monotonic() - t_unit),
            )
        busy = time.monotonic() - t0
        if server:
            server.join()
        source.close()
    except BaseException as exc:
        if comm and size > 1 and not isinstance(exc, KeyboardInterrupt):
            # One rank failing cannot finish the job; stop all of them, a rerun resumes.
            what = str(exc) if isinstance(exc, GalcfError) else traceback.format_exc()
            print(f"galcf-hpc: error: rank {rank}: {what}\nstopping every rank; rerun to resume", flush=True)
            comm.Abort(getattr(exc, "exit_code", 1))
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
        "num_galaxies": plan["num_galaxies"],
        "num_units": len(units),
        "skipped_units": plan["skipped"],
        "computed_units": len(plan["todo"]),
        "rejected_parts": plan["rejected"],
        "judges": list(plan["judges"]),
        "ranks": size,
        "device": str(dev),
        "work_seconds": wall,
        "per_rank": [
            {"rank": r, "units": int(u), "galaxies": int(g), "seconds": s, "galaxies_per_s": g / s if s > 0 else 0.0}
            for r, (u, g, s) in enumerate(everyone)
        ],
        "catalog": str(Path(plan["out_dir"]) / store.CATALOG),
    }
    write_json(Path(plan["out_dir"]) / "summary.json", summary)
    return summary


def _catalog_fields(f, path, attrs, judges):
    """The schema of an open catalog.h5, from its attributes and the shapes of key, h and z."""
    import h5py

    for name, ndim in (("key", 1), ("h", 2), ("z", 2)):
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != ndim:
            raise DataError(
                f"{path}: dataset '{name}' is {'missing' if ds is None else 'not what catalog run writes'}, so "
                "the catalog cannot be checked; rerun `galcf-hpc catalog run` with the same arguments to rewrite it"
            )
    return store.schema(
        f["key"].dtype.itemsize,
        NUM_CLASSES,
        f["h"].shape[1],
        f["z"].shape[1],
        len(attrs["targets"]),
        int(attrs["image_size"]),
        str(attrs["image_dtype"]),
        list(judges),
        str(attrs["images"]),
    )


def verify_catalog(out_dir, progress=None):
    """Check a finished catalog directory; returns a summary dict, raises DataError listing
    every problem found. Reads through the virtual datasets of catalog.h5 only once every
    part file has been found valid (see :mod:`.store` for why)."""
    import h5py

    out_dir = Path(out_dir)
    path = out_dir / store.CATALOG
    attrs = store.read_attrs(path)
    problems, notes = [], []
    try:
        run = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError) as exc:
        run = {}
        problems.append(f"{out_dir / 'run.json'} cannot be read ({exc})")
    for k in ("checkpoint_sha256", "input", "num_galaxies", "unit_size", "images", "image_dtype", "decode_batch"):
        if run and run.get(k) != (attrs[k].item() if hasattr(attrs[k], "item") else attrs[k]):
            problems.append(f"attribute '{k}' of catalog.h5 is {attrs[k]!r}, run.json says {run.get(k)!r}")
    judges = dict(zip((str(j) for j in attrs["judge_names"]), (str(h) for h in attrs["judge_sha256"])))
    if run and run.get("judges") != judges:
        problems.append(f"judges of catalog.h5 are {judges!r}, run.json says {run.get('judges')!r}")
    n, targets = int(attrs["num_galaxies"]), [int(t) for t in attrs["targets"]]
    units = store.work_units(n, int(attrs["unit_size"]))
    # what every part must record: this catalog's checkpoint, judges, targets and input
    expected = {
        "checkpoint_sha256": str(attrs["checkpoint_sha256"]),
        "judges": judges,
        "targets": targets,
        "input_fingerprint": str(attrs["input_fingerprint"]),
    }
    if "precision" in attrs:  # catalogs made before the precision was recorded have none
        expected["precision"] = str(attrs["precision"])
    source, bad_parts = None, []
    if Path(attrs["input"]).exists():
        try:
            source = open_source(attrs["input"])
        except DataError as exc:
            problems.append(f"input {attrs['input']} cannot be read, so keys and rows were not compared ({exc})")
        else:
            if source.fingerprint != expected["input_fingerprint"]:
                problems.append(
                    f"input {attrs['input']} has changed since the catalog was made (fingerprint "
                    f"{source.fingerprint!r}, catalog.h5 records {expected['input_fingerprint']!r}); rerun "
                    "into a new --out to match the current input"
                )
                source.close()
                source = None
    else:
        notes.append(f"input {attrs['input']} no longer exists; keys checked for uniqueness only")
    try:
        with h5py.File(path, "r") as f:
            fields = _catalog_fields(f, path, attrs, judges)
            # Every part valid (and its rows of the input unchanged: one read of the whole
            # input), and catalog.h5 mapping exactly these files, before any value is read
            # through the virtual datasets: a missing part would read as fill values, or as
            # another catalog's rows (HDF5 falls back to the current directory).
            bad_parts = store.check_parts(
                out_dir, units, fields, expected, source.unit_sha256 if source else None, progress
            )
            bad = [text for _, text in bad_parts] + store.check_mapping(f, units, fields)
            # with the mapping right, the sources are exactly the parts checked above
            bad = bad or store.check_sources(f, out_dir)
        problems += bad
        if bad:
            problems.append(f"values were not read through {path} (its parts must be fixed first)")
        else:
            # by the path, closed here: worker processes read blocks of units in parallel
            found, keys = store.check_values(path, fields, targets, units)
            problems += found
            if source is not None:
                expected_keys = np.array([k.encode() for k in source.keys])
                if len(expected_keys) != len(keys) or not np.array_equal(expected_keys, keys):
                    missing = sorted(set(source.keys) - {k.decode() for k in keys.tolist()})
                    problems.append(
                        f"keys differ from the input {attrs['input']} ({len(missing)} input keys absent"
                        f"{', e.g. ' + missing[0] if missing else ''}; or in another order)"
                    )
    except OSError as exc:  # a part damaged while it was read, or catalog.h5 itself
        problems.append(f"{path} cannot be read ({exc})")
    finally:
        if source is not None:
            source.close()
    rejected = store.rejected_parts(out_dir)
    if rejected:
        notes.append(
            f"{len(rejected)} file(s) moved aside by `catalog run` are still in {out_dir / store.PARTS} (first: "
            f"{rejected[0].name}); delete them once inspected"
        )
    ckpt = Path(attrs["checkpoint"])
    if ckpt.is_file():
        if file_sha256(ckpt) != attrs["checkpoint_sha256"]:
            problems.append(
                f"checkpoint {ckpt} has changed since the catalog was made (sha256 differs); "
                "rerun into a new --out to match the current checkpoint"
            )
    else:
        notes.append(f"checkpoint {ckpt} no longer exists; its sha256 was not re-checked")
    for name, sha in judges.items():
        judge = _judge_path(attrs["judges_dir"], name)
        if not judge.is_file():
            notes.append(f"judge {judge} no longer exists; its sha256 was not re-checked")
        elif file_sha256(judge) != sha:
            problems.append(
                f"judge {judge} has changed since the catalog was made (sha256 differs); rerun into a "
                "new --out to match the current judges"
            )
    if problems:
        shown = "\n  ".join(problems[:10])
        if len(problems) > 10:
            # the first ten in full, and then still the name of every bad part file
            names = ", ".join(p.name for p, _ in bad_parts)
            shown += f"\n  ... and {len(problems) - 10} more" + (f"; every bad part: {names}" if names else "")
        raise DataError(
            f"{out_dir}: catalog verification failed:\n  {shown}\nRerun `galcf-hpc catalog run` with "
            "the same arguments to recompute missing parts; it moves damaged or foreign part files aside "
            "(parts/unit-NNNNNN.h5.rejected-<reason>) and recomputes them"
        )
    return {"num_galaxies": n, "num_units": len(units), "targets": targets, "notes": notes}
