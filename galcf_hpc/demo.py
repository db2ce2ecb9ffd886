"""``galcf-hpc demo``: the whole pipeline on one machine, as a list of stages.

    data -> judges -> train -> catalog -> explain and report (one pass)

The judges learn from the data alone, so they train before the model: with a time budget
for the whole demo (``run.demo_minutes``) training then gets what the stages before it
used and the stages after it will need leave (:func:`training_minutes`).

Each stage is a function of the :class:`Demo` state that returns its result and reuses
what a previous run left (the synthetic source catalog, shards, a finished run, trained judges, the
catalog job); :func:`run_demo` times every stage. Training runs on local ranks started
with the launcher environment torchrun exports, the catalog job under ``mpiexec`` when it
is on PATH; both fall back to this process with a warning.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .config import load_config
from .errors import Interrupted, UsageError
from .train.distributed import StopSignals, free_port

log = logging.getLogger("galcf_hpc")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"
DEFAULT_RANKS = 2  # enough to exercise DDP (and the catalog job's MPI) on a laptop
# the stages after training (catalog job, explain and report: inference over one split) took
# 0.20-0.43 of the judges' training time in demos of both synthetic configs on two machines
AFTER_TRAINING_PER_JUDGE_SECOND = 0.5
MIN_TRAINING_MINUTES = 1.0


@dataclass
class Demo:
    """What the stages share: the configuration and where each stage writes."""

    config: Path
    sets: list
    cfg: object
    ranks: int
    judge_epochs: int | None = None  # None: each judge's own
    results: dict = field(default_factory=dict)  # stage name -> its result
    started: float = field(default_factory=time.monotonic)  # time.monotonic() when the demo began

    @property
    def run_dir(self):
        return Path(self.cfg.run.out_dir)

    @property
    def catalog_dir(self):
        return self.run_dir / "catalog"


def local_ranks(requested, train_device):
    """Local training processes: ``requested``, else 2 (1 on a one-core machine); when
    training on CUDA at most one per visible GPU (NCCL refuses two ranks on one GPU)."""
    if requested is not None and requested < 1:
        raise UsageError(f"--ranks must be at least 1, got {requested}")
    if train_device != "cpu" and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if requested and requested > gpus:
            log.warning("--ranks %d: only %d GPU(s) visible; training with %d local ranks", requested, gpus, gpus)
        return min(requested or DEFAULT_RANKS, gpus)
    return requested or min(DEFAULT_RANKS, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------
# Stages


def stage_data(demo):
    """Synthesise the catalog with GalSim and shard it (each only when missing)."""
    from .data.classes import NUM_CLASSES
    from .data.galaxy10 import write_catalog
    from .data.shards import write_shards
    from .data.synth import generate
    from .progress import Progress

    cfg, s = demo.cfg, demo.cfg.data.synth
    source, shards = Path(cfg.data.source), Path(cfg.data.shards)
    if not source.exists():
        fractions = [1.0 / NUM_CLASSES] * NUM_CLASSES if s.balanced else None
        cat = generate(
            s.n, s.size, s.seed, workers=s.workers, class_fractions=fractions, progress=Progress(s.n, "synth")
        )
        write_catalog(source, **cat, attrs={"generator": f"galcf-hpc {__version__} GalSim synthetic", "seed": s.seed})
        log.info("synthesised %d galaxies into %s", s.n, source)
    if not (shards / "train" / "manifest.json").exists():
        write_shards(
            source,
            shards,
            shard_size=cfg.data.shard_size,
            fractions=tuple(cfg.data.split_fractions),
            seed=cfg.data.split_seed,
            match_radius_arcsec=cfg.data.match_radius_arcsec,
            image_format=cfg.data.image_format,
            jpeg_quality=cfg.data.jpeg_quality,
        )
        log.info("sharded %s into %s", source, shards)
    return shards


def training_minutes(cfg, elapsed_seconds, judge_seconds):
    """``train.time_limit_minutes`` for the demo's training under ``run.demo_minutes``: the
    budget less what the demo has used (``elapsed_seconds``) and what the stages after
    training are expected to take (:data:`AFTER_TRAINING_PER_JUDGE_SECOND` times the judges'
    training time, which scales with the machine and the image size as they do), at most the
    config's own limit and at least :data:`MIN_TRAINING_MINUTES`. None without a budget."""
    budget = cfg.run.demo_minutes
    if budget <= 0:
        return None
    after = AFTER_TRAINING_PER_JUDGE_SECOND * judge_seconds
    minutes = (60.0 * budget - elapsed_seconds - after) / 60.0
    own = cfg.train.time_limit_minutes
    log.info(
        "run.demo_minutes %g: %.1f min used, about %.1f min for the stages after training: training gets %.1f min%s",
        budget,
        elapsed_seconds / 60.0,
        after / 60.0,
        minutes,
        f" (train.time_limit_minutes {own:g} is sooner)" if 0 < own < minutes else "",
    )
    if minutes < MIN_TRAINING_MINUTES:
        log.warning(
            "run.demo_minutes %g leaves %.1f min for training: training gets %g min, and the demo will "
            "overrun its budget (raise run.demo_minutes, or lower judges.epochs or data.synth.n)",
            budget,
            minutes,
            MIN_TRAINING_MINUTES,
        )
        minutes = MIN_TRAINING_MINUTES
    return min(minutes, own) if own > 0 else minutes


def _judge_seconds(demo):
    """The panel's training time from its panel.json (also for judges an earlier demo trained)."""
    panel = demo.results.get("judges") or {}
    return sum(float(judge.get("train_seconds", 0.0)) for judge in panel.values())


def stage_train(demo):
    """Train (or finish training) on the local ranks; returns the run's eval.json. Under
    ``run.demo_minutes`` the time limit is the one :func:`training_minutes` gives."""
    from .train.loop import train

    sets, cfg = list(demo.sets), demo.cfg
    minutes = training_minutes(cfg, time.monotonic() - demo.started, _judge_seconds(demo))
    if minutes is not None:
        sets.append(f"train.time_limit_minutes={minutes:.3f}")
        cfg = load_config(demo.config, sets)
    trained = False
    if demo.ranks > 1:
        log.info("training with %d local ranks (launcher environment as torchrun's, 1 thread each)", demo.ranks)
        trained = train_ranks(demo.config, sets, demo.ranks, cfg)
        if not trained:
            log.warning("falling back to training in this process")
    if not trained:
        train(cfg, resume=True)
    return json.loads((demo.run_dir / "eval.json").read_text())


def stage_judges(demo):
    """The judge panel (RUN/judges/): independent classifiers that decide whether a
    counterfactual looks like its target; trains only the judges not trained yet."""
    from .judges import DEFAULT_PANEL, judges_dir, train_judges
    from .judges.train import PANEL_FILE

    panel_file = judges_dir(demo.run_dir) / PANEL_FILE
    panel = json.loads(panel_file.read_text()) if panel_file.is_file() else {}
    missing = [spec.name for spec in DEFAULT_PANEL if spec.name not in panel]
    if missing:
        train_judges(demo.cfg, names=missing, epochs=demo.judge_epochs)
        panel = json.loads(panel_file.read_text())
    else:
        log.info("judge panel %s exists: reused", panel_file.parent)
    return panel


def stage_catalog(demo):
    """The catalog job on ``explain.split`` -> RUN/catalog/catalog.h5."""
    out = demo.catalog_dir
    if (out / "catalog.h5").exists():
        log.info("catalog %s exists: reused", out / "catalog.h5")
    else:
        run_catalog_job(demo.run_dir, Path(demo.cfg.data.shards) / demo.cfg.explain.split, out, demo.ranks)
    return out


def stage_report(demo):
    """Counterfactuals and their metrics on ``explain.split`` (RUN/counterfactuals.json and
    the grids, as `galcf-hpc explain` writes them; kept as the ``explain`` result) and
    RUN/report/report.html with the catalog summary, from one pass over the split."""
    from .explain.run import explain, load_run
    from .loaders.split import open_split
    from .report import build_report
    from .report.build import MIN_GALAXIES

    # explain and report follow the run's own explain.* (its checkpoint's config), as before
    _, cfg, _ = load_run(demo.run_dir)
    size = open_split(Path(cfg.data.shards) / cfg.explain.split)[0]["num_samples"]
    limit = cfg.explain.max_galaxies or max(MIN_GALAXIES, size)
    if limit < MIN_GALAXIES:  # fewer galaxies explained than a report needs: two passes, as before
        demo.results["explain"] = explain(demo.run_dir)
        return build_report(demo.run_dir, catalog=demo.catalog_dir)
    rep = build_report(demo.run_dir, catalog=demo.catalog_dir, max_galaxies=limit, explain=True)
    demo.results["explain"] = json.loads((demo.run_dir / "counterfactuals.json").read_text())
    return rep


STAGES = (
    ("data", stage_data),
    ("judges", stage_judges),  # the data alone: before training, whose time budget it tells
    ("train", stage_train),
    ("catalog", stage_catalog),
    ("report", stage_report),
)


def run_demo(config=None, sets=(), ranks=None, judge_epochs=None):
    """Run every stage of :data:`STAGES` on ``config`` (default configs/smoke.yaml) with the
    dotted overrides ``sets``; returns {"config", "ranks", "times", "total_seconds",
    and each stage's result under its name}."""
    config = Path(config) if config else DEFAULT_CONFIG
    sets = list(sets or [])
    cfg = load_config(config, sets)
    demo = Demo(
        config=config, sets=sets, cfg=cfg, ranks=local_ranks(ranks, cfg.train.device), judge_epochs=judge_epochs
    )
    t0 = demo.started
    times = {}
    for name, stage in STAGES:
        t = time.monotonic()
        demo.results[name] = stage(demo)
        times[name] = time.monotonic() - t
        log.info("demo stage %s done (%.0f s)", name, times[name])
    return {
        "config": config,
        "ranks": demo.ranks,
        "times": times,
        "total_seconds": time.monotonic() - t0,
        **demo.results,
    }


# ---------------------------------------------------------------------------------------
# Local launchers


def _config_argv(config, sets):
    return ["--config", str(config)] + [x for s in sets for x in ("--set", s)]


def train_ranks(config, sets, ranks, cfg, poll_seconds=0.5):
    """Train with ``ranks`` local processes, 1 torch thread each, the same global batch as
    one process; False when the launch failed.

    Each process gets the environment torchrun would export (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), so `galcf-hpc train` cannot tell the difference; started
    directly there is no elastic agent to start, and when one rank fails the others are
    stopped at once instead of waiting in a collective until the timeout.
    """
    port = free_port()
    # one thread per rank comes from OMP_NUM_THREADS=1 below; the run's config.yaml keeps
    # train.threads 0 (torch's default), so what later loads it (report, explain, judges) runs on
    # every core instead of on the one thread a training rank had
    extra = ["train.threads=0", f"train.global_batch={cfg.train.global_batch or cfg.train.batch_size}"]
    argv = [sys.executable, "-m", "galcf_hpc.cli", "train"] + _config_argv(config, list(sets) + extra) + ["--resume"]
    procs, forwarded = [], None
    # a batch system's or the user's stop (SIGTERM, SIGUSR1) is passed on to the ranks, which
    # save a checkpoint and leave; killed alone, this process would leave them training
    signals = StopSignals()
    try:
        for r in range(ranks):
            env = {
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": str(ranks),
                "LOCAL_RANK": str(r),
                "LOCAL_WORLD_SIZE": str(ranks),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            env.pop("SLURM_CPUS_PER_TASK", None)  # would give each rank that many threads (train.threads 0)
            procs.append(subprocess.Popen(argv, env=env))
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if signals.received and not forwarded:
                forwarded = signals.received
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.Signals[forwarded])
            time.sleep(poll_seconds)
    finally:
        signals.restore()
        for p in procs:
            if p.poll() is None:
                p.kill()
        codes = [p.wait() for p in procs]
    if signals.received:
        raise Interrupted(
            f"stopped by {signals.received}: the {ranks} training ranks saved a checkpoint in {cfg.run.out_dir} "
            f"(exit codes {codes}); run the same command again to continue"
        )
    if any(codes):
        log.warning("training with %d local ranks failed (exit codes %s)", ranks, codes)
        return False
    return True


def run_catalog_job(run_dir, split_dir, out_dir, ranks):
    """The catalog job on one split: ``mpiexec -n ranks`` when mpiexec is on PATH, else in
    this process."""
    from .catalog.job import run_catalog

    mpiexec = shutil.which("mpiexec")
    args = [
        "catalog",
        "run",
        "--checkpoint",
        str(run_dir),
        "--input",
        str(split_dir),
        "--out",
        str(out_dir),
        "--unit-size",
        "64",
        "--device",
        "cpu",
    ]
    if mpiexec and ranks > 1:
        rc = subprocess.call([mpiexec, "-n", str(ranks), sys.executable, "-m", "galcf_hpc.cli"] + args)
        if rc == 0:
            return
        log.warning("mpiexec -n %d catalog run failed (exit code %d); running it in this process", ranks, rc)
    elif not mpiexec:
        log.warning("mpiexec not on PATH: catalog job in a single process")
    run_catalog(run_dir, split_dir, out_dir, unit_size=64, device="cpu")
