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
