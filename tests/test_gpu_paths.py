"""What a GPU run does differently, checked on the CPU: DALI errors of the machine vs the
data, the order of DALI's output copy on torch's stream (fake stream and events), the device
rules (monkeypatched torch.cuda), per-device RNG state, bf16 autocast around the flow, and the
settings DeepSpeed is started with. docs/distributed.md, "On GPUs", describes the rules."""

import pytest
import torch

from galcf_hpc.errors import DataError, DeviceError

# Failure texts as DALI and CUDA print them (DALI issues #2836, #3599, #6149, #2521, #5127, #3387)
MACHINE_FAILURES = {
    "memory": [
        "Critical error in pipeline:\nError when executing Mixed operator ImageDecoder encountered:\n"
        "CUDA allocation failed\nCurrent pipeline object is no longer valid.",
        "Critical error in pipeline: std::bad_alloc\nCurrent pipeline object is no longer valid.",
        "CUDA runtime API error cudaErrorMemoryAllocation (2):\nout of memory",
    ],
    "device": [
        "CUDA runtime API error cudaErrorInvalidDevice (101): invalid device ordinal",
        "CUDA driver API error CUDA_ERROR_INVALID_DEVICE (101): invalid device ordinal",
    ],
    "driver": [
        "Critical error in pipeline:\nError in CPU operator 'nvidia.dali.fn.decoders.image',\nwhich was used in the "
        'pipeline definition with the following traceback:\n\n  File "dali.py", line 36, in galaxies\n'
        "    images = fn.decoders.image(encoded, device='mixed')\n\nencountered:\n\nError in thread 0: CUDA runtime "
        "API error cudaErrorInvalidValue (1):\ninvalid argument\nCurrent pipeline object is no longer valid.",
        '[/opt/dali/dali/core/device_guard.cc:33] Assert on "cuInitChecked()" failed: Failed to load libcuda.so. '
        "Check your library paths and if the driver is installed correctly.",
    ],
}


def _dali_loader(split_dir, **kw):
    from galcf_hpc.loaders.dali import DaliLoader

    return DaliLoader(split_dir, **{"batch_size": 8, "image_size": 16, "num_threads": 1, **kw})


def _real_decoding_failure(split_dir, patch_member):
    """DALI's own RuntimeError text for a damaged PNG in ``split_dir``."""
    patch_member(split_dir / "shard-000000.tar", 3, "png", lambda d: bytes(len(d)))
    loader = _dali_loader(split_dir, train=False, augment=False)
    pipe = loader._pipeline()
    with pytest.raises(RuntimeError) as failed:
        for _ in range(loader.reader_batches):
            pipe.run()
    return str(failed.value)


def test_dali_failures_of_the_machine_are_not_data_errors(sharded_copy, patch_member, monkeypatch):
    pytest.importorskip("nvidia.dali")
    from galcf_hpc.loaders import dali

    decoding = _real_decoding_failure(sharded_copy / "test", patch_member)
    assert dali.machine_failure(decoding) is None
    for kind, texts in MACHINE_FAILURES.items():
        assert [dali.machine_failure(t) for t in texts] == [kind] * len(texts)
    # the pipeline definition DALI quotes (device="mixed", device_id) does not make an error the machine's
    assert dali.machine_failure(decoding.replace("encountered:", "device_id=1 device='mixed'\nencountered:", 1)) is None

    loader = _dali_loader(sharded_copy / "val", train=False)
    redecoded = []
    monkeypatch.setattr(dali, "_first_bad_sample", lambda *a: redecoded.append(a))
    for kind, texts in MACHINE_FAILURES.items():
        for text in texts:
            err = loader._error(RuntimeError(text))
            assert type(err) is DeviceError and err.exit_code == 7, text
            assert "not of the shards" in str(err) and dali._MACHINE_HINTS[kind] in str(err)
            assert "data verify" not in str(err)
    assert redecoded == []  # no PIL re-decode of the data for a failure of the machine
    err = loader._error(RuntimeError(decoding))
    assert type(err) is DataError and "data verify" in str(err) and len(redecoded) == 1
    assert "invalid device ordinal" in str(loader._error(RuntimeError(MACHINE_FAILURES["device"][0])))


class _Log(list):
    def stream(self, device=None):
        return "torch-stream"


class _FakeEvent:
    def __init__(self, log):
        self.log = log

    def record(self, stream):
        self.log.append(("record", stream))

    def synchronize(self):
        self.log.append("synchronize")


class _RecordingPipe:
    """The real CPU pipeline, with ``run(stream)`` recorded (the stream itself is dropped)."""

    def __init__(self, pipe, log):
        self.pipe, self.log = pipe, log

    def run(self, *stream):
        self.log.append(("run", *stream))
        return self.pipe.run()

    def checkpoint(self):
        return self.pipe.checkpoint()


def test_dali_output_copy_is_ordered_on_torchs_stream(sharded, monkeypatch):
    """On a GPU the batch is copied on torch's current stream, DALI hands its outputs over on
    that stream, and the copy has finished before the next run() may reuse DALI's buffer."""
    pytest.importorskip("nvidia.dali")
    from galcf_hpc.loaders import dali

    plain = list(_dali_loader(sharded.out / "val", train=False))
    log = _Log()
    fn, types, pipeline_def, feed_ndarray = dali._import_dali()

    def feed(tensor, out, cuda_stream=None):
        log.append(("copy", cuda_stream))
        return feed_ndarray(tensor, out)

    monkeypatch.setattr(dali, "_import_dali", lambda: (fn, types, pipeline_def, feed))
    monkeypatch.setattr(torch.cuda, "current_stream", log.stream)
    monkeypatch.setattr(torch.cuda, "Event", lambda: _FakeEvent(log))
    loader = _dali_loader(sharded.out / "val", train=False)
    loader.device = "gpu"  # the GPU code path; the data still come from the CPU pipeline
    loader._pipe = _RecordingPipe(loader._pipeline(), log)
    batches = list(loader)
    assert len(batches) == len(plain) >= 2
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(batches, plain))
    run, copy, record, sync = (("run", log.stream()), ("copy", log.stream()), ("record", log.stream()), "synchronize")
    steps, rest = loader.steps_per_epoch, loader.reader_batches - loader.steps_per_epoch
    expected = [run] + [copy, record, sync, run] * (steps - 1) + [copy, record]
    expected += [sync] + [run] * rest if rest else []  # the rest of the reader epoch
    assert log == expected
    loader.close()  # the pipeline (and its buffers) go only after the last copy
    assert log == expected + ([] if rest else [sync])


def _bf16_model():
    from galcf_hpc.model.galcf import GalaxyCF

    torch.manual_seed(0)
    model = GalaxyCF(16, [8, 16], 16, 8, flow_blocks=2, flow_hidden=32, flow_clamp=2.0, mean_distance=5.0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a flow far from the identity (its last layers start at zero)
        for p in model.flow.parameters():
            if p.requires_grad:  # not the fixed permutations
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_flow_gmm_and_counterfactual_geometry_stay_fp32_under_bf16_autocast():
    """bf16 autocast (the GPU's training and catalog set-up; here on the CPU) changes the
    convolutions only: the flow runs in fp32 with autocast off in the forward pass, the
    classification, the counterfactual's inversion and the re-encoding of the consistency term,
    and its round trip is as exact as without autocast."""
    from galcf_hpc.config import LossConfig
    from galcf_hpc.model.flow import flow_inverse
    from galcf_hpc.train.objective import consistency_loss

    model = _bf16_model()
    calls = []
    model.flow.register_forward_hook(
        lambda m, inp, out: calls.append((inp[0].dtype, out[0].dtype, torch.is_autocast_enabled("cpu"), out[0]))
    )
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lat = model(x)
        cls = model.classify(x)
        _, h_cf = model.counterfactual_latent(lat.z, lat.h, cls.pred, cls.pred, 1.0)  # own class: the round trip
        z1_back = calls[-1][3]
        consistency_loss(model, lat.z, lat.h, lat.recon, LossConfig(cf_augment=True))
    assert lat.z.dtype == lat.recon.dtype == torch.bfloat16  # the convolutions did run in bf16
    assert lat.h.dtype == lat.logdet.dtype == cls.logits.dtype == h_cf.dtype == torch.float32
    assert len(calls) == 5 and all(c[:3] == (torch.float32, torch.float32, False) for c in calls), calls
    with torch.no_grad():  # the same numbers as the flow alone in fp32, without autocast
        h32, logdet32 = model.hidden(lat.z1.float())
        fp32_error = (flow_inverse(model.flow, h32) - lat.z1.float()).abs().max()
    assert torch.equal(lat.h, h32) and torch.equal(lat.logdet, logdet32)
    assert (lat.h - lat.z1.float()).abs().max() > 0.1  # not the identity
    error = (z1_back - lat.z1.float()).abs().max()
    assert error < 1e-5 and abs(float(error) - float(fp32_error)) < 1e-7


_DEEPSPEED_PRECISION = r"""
import json, os, sys
import torch
import torch.distributed as dist
from torch import nn

port = sys.argv[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
import deepspeed
from galcf_hpc.config import config_from_dict
from galcf_hpc.errors import ConfigError
from galcf_hpc.train import engines

found = {}
for stage in (0, 2):
    for safe in ("package", "deepspeed default"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        config = engines.deepspeed_config(config_from_dict({"train": {"zero_stage": stage}}).train, 2, 2, bf16=True)
        if safe != "package":
            del config["torch_autocast"]["lower_precision_safe_modules"]
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config,
            model_parameters=list(model.parameters()), dist_init_required=False,
        )
        try:
            engines.check_precision(engine, config)
            verdict = "ok"
        except ConfigError as exc:
            verdict = str(exc)
        out = engine(torch.rand(2, 3, 8, 8))
        engine.backward(out.float().sum())
        engine.step()
        found[f"{stage}/{safe}"] = [verdict, str(out.dtype), str(model[2].weight.dtype)]
print(json.dumps(found))
"""


def test_deepspeed_runs_bf16_autocast_and_reduces_gradients_in_fp32():
    """The DeepSpeed config of a bf16 run, initialised for real (CPU, gloo, one rank): autocast
    is on, the weights stay fp32, and check_precision accepts it, where DeepSpeed's default
    list of lower-precision modules (bf16 gradient reduction of Conv and Linear) is refused."""
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    pytest.importorskip("deepspeed")
    from galcf_hpc.errors import ConfigError
    from galcf_hpc.train import engines
    from galcf_hpc.train.distributed import free_port

    done = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED_PRECISION, str(free_port())],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    found = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    for stage in (0, 2):
        assert found[f"{stage}/package"] == ["ok", "torch.bfloat16", "torch.float32"]
        verdict, dtype, _ = found[f"{stage}/deepspeed default"]
        assert "the gradients of Conv2d (torch.bfloat16), Linear (torch.bfloat16) layers" in verdict
        assert dtype == "torch.bfloat16"
    # a DeepSpeed that ignored the torch_autocast section (before 0.17.2) would train in fp32
    ignored = SimpleNamespace(
        torch_autocast_enabled=lambda: False, communication_data_type=torch.float32, module=torch.nn.Linear(2, 2)
    )
    config = engines.deepspeed_config(SimpleNamespace(grad_accumulation=1, grad_clip=1.0, zero_stage=1), 2, 2, True)
    with pytest.raises(ConfigError, match=r"torch autocast is off \(configured: on\)"):
        engines.check_precision(ignored, config)
    engines.check_precision(ignored, {**config, "torch_autocast": {"enabled": False}})  # fp32 run: as configured


def _fake_gpus(monkeypatch, count, calls=None):
    """torch.cuda as a process sees it with ``count`` visible GPUs (``calls`` records set_device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: (calls if calls is not None else []).append(str(d)))


def test_one_rank_per_visible_gpu(monkeypatch):
    """Local rank r takes GPU r of a node's 4; with one GPU visible per task (psslurm, srun
    --gpu-bind) every rank takes GPU 0; more local ranks than visible GPUs fail before NCCL
    would ("Duplicate GPU detected"), naming both numbers and what to change."""
    from galcf_hpc.device import resolve_device
    from galcf_hpc.errors import ConfigError
    from galcf_hpc.train.distributed import detect

    _fake_gpus(monkeypatch, 4)
    assert [resolve_device("auto", r) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]
    torchrun = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2"}
    assert detect(environ=torchrun).device == torch.device("cuda", 2) and detect(environ=torchrun).backend == "nccl"
    assert resolve_device("cpu", 3) == torch.device("cpu")
    _fake_gpus(monkeypatch, 1)
    assert [resolve_device("cuda", r) for r in range(4)] == [torch.device("cuda", 0)] * 4
    _fake_gpus(monkeypatch, 2)
    with pytest.raises(ConfigError, match=r"local rank 3 needs GPU 3, but only 2 GPU\(s\) are visible.*one rank per"):
        detect(environ={"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "3"})
    _fake_gpus(monkeypatch, 0)
    assert resolve_device("auto", 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="cuda requested but no GPU is visible"):
        resolve_device("cuda", 0)


@pytest.fixture
def restore_torch_settings():
    benchmark, deterministic = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    yield
    torch.backends.cudnn.benchmark = benchmark
    torch.use_deterministic_algorithms(deterministic)


def test_rank_settings_on_a_gpu(monkeypatch, restore_torch_settings):
    """configure_process: this rank's GPU becomes the current device, cuDNN autotunes the
    fixed training shapes unless the run is deterministic, and run.deterministic sets the
    cuBLAS workspace that deterministic GEMMs need (a value already set is kept)."""
    from galcf_hpc.device import use_device
    from galcf_hpc.train.distributed import DistEnv, configure_process

    calls = []
    _fake_gpus(monkeypatch, 4, calls)
    gpu = DistEnv(1, 1, 2, "h", 1, "torchrun/env", torch.device("cuda", 1), "nccl")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(False)  # an in-process training before may have left it on
    configure_process(gpu)
    assert calls == ["cuda:1"] and torch.backends.cudnn.benchmark is True
    assert (
        "CUBLAS_WORKSPACE_CONFIG" not in __import__("os").environ and not torch.are_deterministic_algorithms_enabled()
    )
    configure_process(gpu, deterministic=True)
    assert calls == ["cuda:1"] * 2 and torch.backends.cudnn.benchmark is False
    assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    configure_process(gpu, deterministic=True)
    assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    use_device(torch.device("cpu"))  # nothing on the CPU
    assert calls == ["cuda:1"] * 3 and torch.backends.cudnn.benchmark is False


def test_rng_state_is_this_ranks_gpu_only(monkeypatch):
    """A checkpoint keeps the generator of this rank's GPU only (never every visible GPU's), and
    a resume restores it onto the GPU the rank has now, whatever the visibility was then."""
    from galcf_hpc.train.checkpoint import rng_state, set_rng_state

    got, put = [], []

    def refuse(*a):
        raise AssertionError("every visible GPU's generator touched")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: got.append(str(d)) or torch.tensor([7, int(d.index)]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: put.append((s.tolist(), str(d))))
    state = rng_state(torch.device("cuda", 3))  # rank with local rank 3 on a node with 4 GPUs visible
    assert got == ["cuda:3"] and state["cuda"].tolist() == [7, 3] and torch.equal(state["torch"], torch.get_rng_state())
    set_rng_state(state, torch.device("cuda", 0))  # resumed with one GPU visible per task
    assert put == [([7, 3], "cuda:0")]
    set_rng_state(state, torch.device("cpu"))  # on the CPU the GPU generator is ignored
    assert put == [([7, 3], "cuda:0")] and set(rng_state(torch.device("cpu"))) == {"torch"}


class OnGPU(torch.Tensor):
    """A CPU tensor that behaves like a CUDA tensor where device handling can go wrong: no
    ``.numpy()``, no arithmetic with a CPU tensor of more than 0 dims (indexing with a CPU
    mask is allowed, as on a GPU); ``.cpu()`` and ``.to("cpu")`` give a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
        to_cpu = func is torch.Tensor.to and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))
        if func is torch.Tensor.cpu or to_cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return torch.Tensor.clone(args[0])
        if func is torch.Tensor.to and any(str(a).startswith("cuda") for a in (*args[1:], *kwargs.values())):
            return args[0]  # already "there"
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        mine = any(isinstance(t, cls) for t in flat)
        cpu = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, cls) and t.dim() > 0]
        if mine and cpu and func not in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found cuda:0 and cpu ({func})")
        return super().__torch_function__(func, types, args, kwargs)


def test_evaluation_and_reports_take_batches_on_the_device():
    """Validation (train/evaluate.py) and the report's pools get labels, predictions and
    images on the device (DALI on a GPU, the synthetic back-end): they compare and convert
    them on the CPU, and come to the same numbers as with CPU batches."""
    from galcf_hpc.data.classes import NUM_CLASSES
    from galcf_hpc.explain.figures import _to_numpy
    from galcf_hpc.metrics import confusion_matrix
    from galcf_hpc.model.galcf import Classification
    from galcf_hpc.report.collect import OutlierPool
    from galcf_hpc.train.evaluate import evaluate

    g = torch.Generator().manual_seed(0)
    labels, preds = torch.randint(0, NUM_CLASSES, (32,), generator=g), torch.randint(0, NUM_CLASSES, (32,), generator=g)
    gpu = OnGPU(labels)
    with pytest.raises(RuntimeError, match="same device"):
        gpu * NUM_CLASSES + preds  # the mistake the fake device catches
    with pytest.raises(TypeError, match="numpy"):
        gpu.numpy()
    assert torch.equal(confusion_matrix(gpu, OnGPU(preds), NUM_CLASSES), confusion_matrix(labels, preds, NUM_CLASSES))
    assert torch.equal(
        confusion_matrix(labels, OnGPU(preds), NUM_CLASSES), confusion_matrix(labels, preds, NUM_CLASSES)
    )

    images = torch.rand(32, 3, 8, 8, generator=g)

    class Model(torch.nn.Module):  # nearest-mean classifier stand-in: pred fixed per image
        def classify(self, x, views=None):
            pred = OnGPU(preds[: len(x)]) if isinstance(x, OnGPU) else preds[: len(x)]
            return Classification(pred, None, None, x.mean((2, 3)))

        def decoder(self, z):
            return z[:, :, None, None].expand(-1, 3, 8, 8)

    def batches(wrap):
        valid = torch.arange(32) < 29  # a padded last batch: valid is made on the CPU
        yield {"images": wrap(images), "labels": wrap(labels), "valid": valid}

    on_cpu = evaluate(Model(), batches(lambda t: t), "cpu", 1.0, cf_limit=0)
    on_gpu = evaluate(Model(), batches(OnGPU), "cuda", 1.0, cf_limit=0)
    same = __import__("json").dumps(on_gpu.classification, sort_keys=True)  # NaN for an absent class
    assert same == __import__("json").dumps(on_cpu.classification, sort_keys=True)
    assert on_cpu.classification["accuracy"] > 0 and on_cpu.classification["num_galaxies"] == 29
    assert on_gpu.recon_mse == pytest.approx(on_cpu.recon_mse)

    pool, plain = OutlierPool(k=3), OutlierPool(k=3)
    distance = torch.rand(32, NUM_CLASSES, generator=g)
    pool.add(0, OnGPU(distance), OnGPU(images))
    plain.add(0, distance, images)
    assert pool.indices("far") == plain.indices("far") and len(pool.images("far")) == 3
    assert all((a == b).all() for a, b in zip(pool.images("between"), plain.images("between")))
    assert (_to_numpy(OnGPU(images)) == images.numpy()).all()


def test_cpu_bf16_autocasts_only_where_asked_and_where_the_cpu_has_bf16(monkeypatch, caplog):
    """``train.cpu_bf16`` turns bf16 autocast on for a CPU step, only on a CPU with AMX-BF16 or
    AVX512-BF16 (elsewhere fp32 and a warning); without it a CPU step stays fp32."""
    from galcf_hpc import device as devmod
    from galcf_hpc.config import config_from_dict

    def enabled(cfg):
        with devmod.training_autocast(torch.device("cpu"), cfg.train):
            return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    on = config_from_dict({"train": {"cpu_bf16": True}})
    assert not enabled(config_from_dict({}))[0]
    monkeypatch.setattr(devmod, "_warned", [])  # as in a fresh process
    for caps, expected in (({"amx_bf16": True}, True), ({"avx512_bf16": True}, True), ({"avx2": True}, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        caplog.clear()
        assert enabled(on) == ((True, torch.bfloat16) if expected else (False, torch.get_autocast_dtype("cpu")))
        assert ("neither AMX-BF16 nor AVX512-BF16" in caplog.text) is not expected
    # once per process: the catalog job asks for every unit it runs
    caplog.clear()
    with devmod.inference_autocast(torch.device("cpu"), on.train):
        assert not torch.is_autocast_enabled("cpu")
    assert "neither AMX-BF16" not in caplog.text
    assert not torch.is_autocast_enabled("cpu")


def test_ddp_engine_trains_a_cpu_step_in_bf16_with_train_cpu_bf16(monkeypatch):
    """The DDP engine's step under ``train.cpu_bf16``: encoder and decoder run in bf16, the
    loss terms stay finite and within bf16 rounding of the same step in fp32, and the weights
    stay fp32."""
    from galcf_hpc.config import config_from_dict
    from galcf_hpc.model.galcf import GalaxyCF
    from galcf_hpc.train.distributed import DistEnv
    from galcf_hpc.train.engines import DDPEngine, Objective

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    env = DistEnv(0, 0, 1, "127.0.0.1", 0, "single", torch.device("cpu"), "gloo")
    loss = {"perceptual": 0.0, "cf_critic": 1.0, "cf_critic_colour": 1.0, "rec_ssim": 20.0, "rec_features": 1.0}
    cfg = config_from_dict({"loss": loss})
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 10
    found = {}
    for cpu_bf16 in (False, True):
        torch.manual_seed(0)
        model = GalaxyCF(16, [8, 16], 16, 8, 2, 32, 2.0, 5.0, luminance_critic=True, colour_critic=True)
        dtypes = []
        model.decoder.register_forward_hook(lambda m, i, out, seen=dtypes: seen.append(out.dtype))
        train = config_from_dict({"train": {"cpu_bf16": cpu_bf16}}).train
        engine = DDPEngine(train, Objective(model, None, cfg.loss), env, lambda s: 1.0)
        torch.manual_seed(1)
        terms = engine.micro_step(x, y, cf_active=True, boundary=True)
        found[cpu_bf16] = {k: float(v) for k, v in terms.items()}
        assert set(dtypes) == {torch.bfloat16 if cpu_bf16 else torch.float32}
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(torch.tensor(list(found[True].values()))).all()
    for key, value in found[False].items():
        if key != "acc":
            assert found[True][key] == pytest.approx(value, rel=0.03, abs=2e-3), key
