"""NVIDIA DALI back-end: ``fn.readers.webdataset`` over the shards and their index files,
image decoding and the paper's augmentation on the GPU (``mixed`` decoder) or on the CPU.

One pipeline definition serves both devices; CPU-only pipelines use ``device_id=None``
(the only value DALI accepts without CUDA), so laptops and CI run the same code as a GPU
node. Batches follow the loader contract of ``galcf_hpc.loaders`` (images on the pipeline's
device: ``cuda:<device_id>`` or CPU).

Sharding by rank: DALI gives rank r of k the contiguous sample range
``[floor(N r / k), floor(N (r+1) / k))`` of the split in shard order, padded (``pad_last_batch``)
with repeats of its last sample to ``ceil(N / k)`` rounded up to whole batches, so every rank
reads the same number of batches per reader epoch.
- training: the reader shuffles within the rank's range (buffer of ``initial_fill``) and
  moves every rank to the next range each epoch (``stick_to_shard=False``), so ranks stay
  disjoint within an epoch and see different galaxies across epochs. A rank runs
  ``floor(floor(N / k) / B)`` steps (the same count as the torch back-end) and reads the
  rest of the reader epoch (under one batch of real samples plus the padding) without
  returning it: every returned sample is real and none repeats within the epoch.
- evaluation: no shuffling, every rank keeps its range; ``valid`` is False on the padding,
  so the valid samples of all ranks are the split, each exactly once.

Augmentation (training): rotation by an angle uniform in [-deg, +deg] from the pipeline's
random generator (the angles come back as ``batch["angles"]``), central crop and resize as
one affine map sampled once at the output size (``_warp``, the same transform as the torch
back-end's ``augment.warp_batch``: an antialiased reduction of the cutout where the crop is
shrunk, then one bilinear ``fn.warp_affine``, zeros outside), float CHW in [0, 1]. Without
augmentation: the central crop and an antialiased linear resize in one ``fn.resize`` with an
absolute region of interest (the crop box of ``augment.crop_box``). Both equal the torch
back-end's output to within rounding of the resampling filters (tests: 1/255 without
rotation, 2/255 with it).

State: ``state_dict()`` holds (epoch, step) and the pipeline's own checkpoint (readers'
positions and the random generators, ``enable_checkpointing=True``); a loader restored from
it rebuilds its pipeline from that checkpoint and continues the epoch where it stopped with
the same samples and the same angles.
"""

import hashlib
import re

import numpy as np
import torch

from galcf_hpc.data.classes import NUM_CLASSES
from galcf_hpc.errors import CheckpointError, ConfigError, DataError, DeviceError
from galcf_hpc.loaders.augment import crop_box, reduced_size
from galcf_hpc.loaders.split import EpochPosition, ceil_div, open_split, steps_per_epoch, verify_hint

_LAYOUT = ("world_size", "rank", "batch_size", "num_samples", "train", "seed", "device")
_SHARD_IN_MESSAGE = re.compile(r"[^\s'\"]*\.tar")
# DALI failures that come from the machine, not from the shards (texts as DALI and CUDA write
# them: "CUDA allocation failed", "CUDA runtime API error cudaErrorInvalidDevice (101): invalid
# device ordinal", "CUDA driver API error CUDA_ERROR_INVALID_DEVICE", "Assert on
# \"cuInitChecked()\" failed", "std::bad_alloc", nvJPEG allocator/execution failures)
_MACHINE = {
    "memory": re.compile(r"out[ _]of[ _]memory|allocation failed|bad_alloc|MemoryAllocation|ALLOCATOR_FAILURE", re.I),
    "device": re.compile(r"invalid[ _]?device|device ordinal|NoDevice|NO_DEVICE|no CUDA-capable device", re.I),
    "driver": re.compile(
        r"cuInit|libcuda|driver version|insufficient ?driver|cudaErrorInsufficientDriver|"
        r"CUDA (?:runtime|driver) API error|CUDA_ERROR_|cudaError|NVJPEG_STATUS_(?:EXECUTION_FAILED|ARCH_MISMATCH|"
        r"INTERNAL_ERROR|NOT_INITIALIZED)|NVML",
        re.I,
    ),
}
_MACHINE_HINTS = {
    "memory": "the GPU ran out of memory: a smaller train.batch_size, fewer DALI threads, no other process on "
    "this GPU (nvidia-smi), or data.device: cpu",
    "device": "the pipeline's GPU is not visible to this process: one rank per visible GPU, and "
    "CUDA_VISIBLE_DEVICES / srun --gres and --ntasks-per-node that agree (docs/distributed.md, On GPUs)",
    "driver": "the DALI wheel must match the CUDA driver (nvidia-smi shows the driver's CUDA version: "
    "nvidia-dali-cuda120 for 12.x, nvidia-dali-cuda130 for 13.x) and the GPU must work (nvidia-smi); "
    "data.device: cpu takes the GPU out of the data path",
}


def machine_failure(text):
    """``"memory"``, ``"device"`` or ``"driver"`` when a DALI error text reports a failure of the
    machine (GPU memory, a device this process cannot use, the driver or CUDA libraries),
    else None: the shards are then the suspects. Only DALI's own reason counts (after
    "encountered:"), not the pipeline definition it quotes."""
    reason = str(text).split("encountered:", 1)[-1]
    return next((kind for kind, pattern in _MACHINE.items() if pattern.search(reason)), None)


def _import_dali():
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError:
        raise ConfigError(
            "data.loader is 'dali' but NVIDIA DALI is not installed; install the extra that "
            "matches the CUDA of this machine: pip install 'galcf-hpc[dali-cuda13]' (or "
            "[dali-cuda12]), or set data.loader: torch"
        ) from None
    return fn, types, pipeline_def, feed_ndarray


def resolve_data_device(device):
    """``data.device`` (gpu | cpu | auto) -> "gpu" or "cpu"; auto picks the GPU when torch sees one."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ConfigError(
            "data.device is 'gpu' but no CUDA device is visible; use data.device: cpu (or auto) on this machine"
        )
    return device


def rank_range(num_samples, rank, world_size):
    """DALI's contiguous sample range [start, stop) of ``rank`` (``shard_id``)."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def _pipeline_seed(seed, rank):
    digest = hashlib.blake2b(f"dali/{seed}/{rank}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _warp(fn, types, images, angles, size, image_size, crop_fraction):
    """The training transform of ``augment.warp_batch`` as DALI operators: the antialiased
    reduction of the whole cutout (when the crop is shrunk), then one bilinear
    ``warp_affine`` at the output size, its output-to-input map composed from the same chain
    as ``augment.warp_matrices`` (DALI's transforms apply in the order they are chained)."""
    anchor, side = crop_box(size, crop_fraction)
    reduced = reduced_size(size, image_size, crop_fraction)
    if reduced != size:
        images = fn.resize(images, size=[reduced, reduced], antialias=True, interp_type=types.INTERP_LINEAR)
    centre = size / 2.0
    matrix = fn.transforms.scale(scale=[side / image_size] * 2)
    matrix = fn.transforms.translation(matrix, offset=[anchor - centre] * 2)
    matrix = fn.transforms.rotation(matrix, angle=angles)
    matrix = fn.transforms.translation(matrix, offset=[centre] * 2)
    matrix = fn.transforms.scale(matrix, scale=[reduced / size] * 2)
    return fn.warp_affine(
        images,
        matrix=matrix,
        size=[image_size, image_size],
        fill_value=0,
        interp_type=types.INTERP_LINEAR,
        inverse_map=True,
        dtype=types.FLOAT,
    )


def _build_pipeline(
    tars,
    idxs,
    num_samples,
    image_ext,
    batch_size,
    source_size,
    image_size,
    crop_fraction,
    rotation_degrees,
    rank,
    world_size,
    train,
    device,
    device_id,
    num_threads,
    seed,
    checkpoint=None,
):
    fn, types, pipeline_def, _ = _import_dali()
    # a buffer as large as the rank's range (up to 1024) shuffles it completely
    initial_fill = max(1, min(1024, -(-num_samples // world_size)))
    anchor, side = crop_box(source_size, crop_fraction)

    @pipeline_def(enable_checkpointing=True)
    def galaxies():
        encoded, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=[image_ext, "cls"],
            missing_component_behavior="error",
            name="Reader",
            shard_id=rank,
            num_shards=world_size,
            random_shuffle=train,
            initial_fill=initial_fill,
            pad_last_batch=True,
            stick_to_shard=not train,
        )
        source = fn.get_property(encoded, key="source_info")
        images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        outputs = [cls, source]
        if rotation_degrees > 0:
            angles = fn.random.uniform(range=[-rotation_degrees, rotation_degrees])
            images = _warp(fn, types, images, angles, source_size, image_size, crop_fraction)
            outputs.append(angles)
        else:
            images = fn.resize(
                images,
                size=[image_size, image_size],
                roi_start=[anchor, anchor],
                roi_end=[anchor + side, anchor + side],
                roi_relative=False,
                antialias=True,
                interp_type=types.INTERP_LINEAR,
                dtype=types.FLOAT,
            )
        # layout and scaling in one pass (cheaper than transpose + arithmetic on the CPU)
        images = fn.crop_mirror_normalize(images, mean=0.0, std=255.0, output_layout="CHW", dtype=types.FLOAT)
        return (images, *outputs)

    kwargs = {"checkpoint": checkpoint} if checkpoint else {}
    pipe = galaxies(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,
        seed=_pipeline_seed(seed, rank),
        prefetch_queue_depth=2,
        **kwargs,
    )
    pipe.build()
    return pipe


def _first_bad_sample(split_dir, start):
    """The DataError of the first sample (from ``start`` on, wrapping) that the torch
    back-end's reader rejects, or None."""
    from galcf_hpc.loaders.torch import ShardDataset

    dataset = ShardDataset(split_dir)
    try:
        for i in list(range(start, len(dataset))) + list(range(start)):
            dataset[i]
    except DataError as exc:
        return exc
    finally:
        dataset.close()
    return None


class DaliLoader(EpochPosition):
    """Iterable of batches for one rank (see the module docstring); same interface as the
    torch back-end's ShardLoader: ``steps_per_epoch``, ``set_epoch``, ``state_dict``,
    ``load_state_dict``, ``close``, ``position``."""

    def __init__(
        self,
        split_dir,
        batch_size,
        image_size,
        rank=0,
        world_size=1,
        train=True,
        augment=True,
        rotation_degrees=180.0,
        crop_fraction=0.7,
        num_threads=1,
        seed=0,
        device="cpu",
        device_id=None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size < 1 or image_size < 1 or num_threads < 1:
            raise ValueError("batch_size, image_size and num_threads must be >= 1")
        _import_dali()
        self.split_dir = split_dir
        manifest, shards = open_split(split_dir, hash_indexes=True)
        self.num_samples = manifest["num_samples"]
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.train, self.seed = bool(train), int(seed)
        self.device = resolve_data_device(device)
        if self.device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        self.steps_per_epoch = steps_per_epoch(
            split_dir, self.num_samples, self.batch_size, self.world_size, self.train
        )
        # batches the reader delivers per epoch and rank (padding included)
        self.reader_batches = ceil_div(ceil_div(self.num_samples, self.world_size), self.batch_size)
        self._image_ext = manifest["image_format"]
        self._args = dict(
            tars=[str(t) for t, _, _ in shards],
            idxs=[str(i) for _, i, _ in shards],
            num_samples=self.num_samples,
            image_ext=self._image_ext,
            batch_size=self.batch_size,
            source_size=manifest["image_size"],
            image_size=int(image_size),
            crop_fraction=float(crop_fraction),
            rotation_degrees=float(rotation_degrees) if (self.train and augment) else 0.0,
            rank=self.rank,
            world_size=self.world_size,
            train=self.train,
            device=self.device,
            device_id=device_id,
            num_threads=int(num_threads),
            seed=self.seed,
        )
        self.epoch, self._step = 0, 0
        self._pipe, self._restore = None, None
        self._torch_device = torch.device(f"cuda:{device_id}") if self.device == "gpu" else torch.device("cpu")
        self._copied = None  # CUDA event after the copy of the last batch out of DALI's buffer

    def _error(self, exc):
        """The error behind a DALI failure: a DeviceError that says what to check when the
        machine failed (GPU memory, device visibility, driver or CUDA libraries; see
        :func:`machine_failure`), else a DataError naming the shard (and sample).

        DALI reports a decoding failure without the sample; the samples of this rank's
        current range are then decoded once more with the torch back-end's reader, whose
        checks name the tar and the key (the error path only; a healthy run never pays it).
        """
        text = str(exc)
        reason = text.split("encountered:", 1)[-1].strip().splitlines()
        reason = next(
            (line.strip() for line in reason if line.strip() and "pipeline" not in line.lower()), type(exc).__name__
        )[:300]
        kind = machine_failure(text)
        if kind is not None:
            on = f"GPU {self._args['device_id']}" if self.device == "gpu" else "the CPU"
            return DeviceError(
                f"DALI failed on {on} ({reason}); a problem of this machine, not of the shards in "
                f"{self.split_dir}: {_MACHINE_HINTS[kind]}"
            )
        shard_id = self.rank if not self.train else (self.rank + self.epoch) % self.world_size
        found = _first_bad_sample(self.split_dir, rank_range(self.num_samples, shard_id, self.world_size)[0])
        if found is not None:
            return DataError(f"DALI stopped ({reason}): {found}")
        found = _SHARD_IN_MESSAGE.search(text)
        where = found.group(0) if found else str(self.split_dir)
        return DataError(f"{where}: DALI cannot read the shards ({reason}); {verify_hint(self.split_dir)}")

    def _pipeline(self):
        if self._pipe is None:
            try:
                self._pipe = _build_pipeline(**self._args, checkpoint=self._restore)
            except RuntimeError as exc:
                raise self._error(exc) from None
            self._restore = None
        return self._pipe

    def _stream(self):
        """torch's current stream on the pipeline's GPU (None on the CPU): DALI hands its
        outputs over on it and the copy into torch runs on it, so the batch is ordered before
        every kernel the training step queues after it."""
        return torch.cuda.current_stream(self._torch_device) if self.device == "gpu" else None

    def _wait_for_copy(self):
        """Block until the copy of the last batch has left DALI's output buffer: DALI may hand
        that buffer to the next iteration once ``run()`` is called again (or free it with the
        pipeline). Only that copy is waited for (and what was queued before it), never the
        training step queued after it."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def _run(self):
        self._wait_for_copy()
        stream = self._stream()
        try:
            return self._pipe.run() if stream is None else self._pipe.run(stream)
        except RuntimeError as exc:
            raise self._error(exc) from None

    def set_epoch(self, epoch):
        """DALI readers advance their epoch by reading, so ``epoch`` must be the loader's own
        (the training loop passes the epoch the loader is in, also after a restore)."""
        if int(epoch) != self.epoch:
            raise ValueError(
                f"the DALI loader is in epoch {self.epoch} (position {self._step}); it cannot "
                f"jump to epoch {epoch}: restore a saved state_dict instead"
            )

    def _keys_and_labels(self, cls, source):
        keys, labels = [], []
        for i in range(len(cls)):
            info = bytes(np.asarray(source[i])).decode("utf-8", "replace")
            tar_path, _, member = info.rpartition(":")
            key = member[: -len(self._image_ext) - 1] if member.endswith("." + self._image_ext) else member
            raw = bytes(np.asarray(cls[i])).strip()
            if not raw.isdigit() or int(raw) >= NUM_CLASSES:
                where = tar_path.rpartition(":")[0] or str(self.split_dir)
                raise DataError(
                    f"{where}: sample {key} has label {raw[:20]!r}, not a class 0-{NUM_CLASSES - 1}; "
                    f"{verify_hint(self.split_dir)}"
                )
            keys.append(key)
            labels.append(int(raw))
        return keys, torch.tensor(labels, dtype=torch.int64)

    def _to_torch(self, tensor_list):
        *_, feed_ndarray = _import_dali()
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self._torch_device)
        stream = self._stream()
        feed_ndarray(dense, out, cuda_stream=stream)  # asynchronous on torch's stream (GPU)
        if stream is not None:
            self._copied = torch.cuda.Event()
            self._copied.record(stream)
        return out.clamp_(0.0, 1.0)  # float rounding of the resampling filters

    def _batch(self, outputs, step):
        images, cls, source = outputs[:3]
        keys, labels = self._keys_and_labels(cls, source)
        batch = {"images": self._to_torch(images), "labels": labels, "keys": keys}
        if len(outputs) > 3:
            batch["angles"] = torch.from_numpy(np.array(outputs[3].as_tensor(), dtype=np.float32).reshape(-1))
        if not self.train:
            start, stop = rank_range(self.num_samples, self.rank, self.world_size)
            position = step * self.batch_size + torch.arange(self.batch_size)
            batch["valid"] = position < (stop - start)
        return batch

    def __iter__(self):
        self._pipeline()
        while self._step < self.steps_per_epoch:
            batch = self._batch(self._run(), self._step)
            self._step += 1
            yield batch
        for _ in range(self.steps_per_epoch, self.reader_batches):  # rest of the reader epoch
            self._run()
        self.epoch, self._step = self.epoch + 1, 0

    def close(self):
        """Free the pipeline (threads, buffers, GPU memory); the loader is done after this."""
        self._wait_for_copy()
        self._pipe = None

    def state_dict(self):
        """Plain types only (the DALI checkpoint is a string), for ``torch.load(weights_only=True)``.

        Taken at an epoch boundary after a full epoch, the reader has already finished its
        epoch, so the checkpoint is consistent with (epoch + 1, step 0)."""
        state = {"epoch": self.epoch, "step": self._step, "backend": "dali", **{k: getattr(self, k) for k in _LAYOUT}}
        if self._pipe is not None:
            state["dali"] = self._pipe.checkpoint()
        elif self._restore is not None:
            state["dali"] = self._restore
        return state

    def load_state_dict(self, state):
        """Restore a position. The same layout resumes the DALI stream exactly; a state taken at
        an epoch boundary by another back-end or layout starts a fresh stream at that epoch."""
        layout = {k: state.get(k) for k in _LAYOUT}
        ours = {k: getattr(self, k) for k in _LAYOUT}
        same = state.get("backend") == "dali" and layout == ours and "dali" in state
        if not same and state.get("step", 0):
            raise CheckpointError(
                f"loader state was saved mid-epoch by the {state.get('backend', 'torch')} back-end with "
                f"{layout}; this DALI loader is {ours}. A run resumes mid-epoch only with the same back-end, "
                "data, seed, world size and batch size (or restart from an epoch boundary)"
            )
        self.epoch, self._step = int(state["epoch"]), int(state["step"])
        self._wait_for_copy()
        self._pipe = None
        self._restore = state["dali"] if same else None
