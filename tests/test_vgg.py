"""VGG16 feature extractor: torchvision key layout, loading, random weights, the torch hub
cache, fetching (no internet here: unreachable URLs, file:// URLs, a monkeypatched download)."""

import functools
import hashlib
import http.server
import logging
import threading
import urllib.error

import pytest
import torch

from galcf_hpc.cli import main
from galcf_hpc.errors import CheckpointError, DataError, GalcfError
from galcf_hpc.model import weights
from galcf_hpc.model.vgg import VGG16Features, load_vgg16
from galcf_hpc.model.weights import VGG16_FILENAME, cached_vgg16_path, fetch_vgg16

# torchvision vgg16 "features": 3x3 convs at these Sequential indices (ReLU after each
# conv, MaxPool after each block), written out from the known architecture.
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def expected_shapes():
    shapes = {}
    in_ch = 3
    for idx, out_ch in zip(CONV_INDICES, CONV_CHANNELS):
        shapes[f"features.{idx}.weight"] = (out_ch, in_ch, 3, 3)
        shapes[f"features.{idx}.bias"] = (out_ch,)
        in_ch = out_ch
    return shapes


FULL_LAYERS = ("relu5_3",)


@pytest.fixture(scope="module")
def random_state():
    """A full torchvision-style vgg16 state dict (random values) incl. classifier keys."""
    gen = torch.Generator().manual_seed(123)
    state = {k: torch.randn(s, generator=gen) * 0.05 for k, s in expected_shapes().items()}
    state["classifier.0.weight"] = torch.randn(8, 4, generator=gen)  # ignored on load
    state["classifier.0.bias"] = torch.randn(8, generator=gen)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, random_state):
    path = tmp_path_factory.mktemp("vgg") / "vgg16-test.pth"
    torch.save(random_state, path)
    return path


def test_state_dict_keys_and_shapes_match_torchvision():
    model = VGG16Features(layers=FULL_LAYERS)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected_shapes())  # same names, same order
    assert got == expected_shapes()


def test_default_layers_build_up_to_relu4_3():
    model = VGG16Features()
    assert len(model.features) == 23  # ... conv4_3 (21), relu4_3 (22)
    keys = set(model.state_dict())
    assert "features.21.weight" in keys and "features.24.weight" not in keys
    outs = model(torch.rand(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [
        (2, 64, 32, 32),
        (2, 128, 16, 16),
        (2, 256, 8, 8),
        (2, 512, 4, 4),
    ]
    assert all((o >= 0).all() for o in outs)  # ReLU outputs


def test_truncated_layers_build_fewer_modules():
    small = VGG16Features(layers=("relu1_2",))
    mid = VGG16Features(layers=("relu2_2",))
    full = VGG16Features()
    assert len(small.features) == 4 < len(mid.features) == 9 < len(full.features)
    assert set(small.state_dict()) == {"features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"}
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())


def test_layers_returned_in_requested_order_and_unknown_rejected():
    model = VGG16Features(layers=("relu2_2", "relu1_2"))
    outs = model(torch.rand(1, 3, 16, 16))
    assert outs[0].shape[1] == 128 and outs[1].shape[1] == 64
    with pytest.raises(ValueError, match="relu9_9"):
        VGG16Features(layers=("relu9_9",))


def test_normalises_with_imagenet_stats_inside():
    model = VGG16Features(layers=("conv1_1",)).init_random(0)
    x = torch.rand(1, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    conv = model.features[0]
    torch.testing.assert_close(model(x)[0], conv((x - mean) / std))
    # Normalisation buffers are not part of the state dict.
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


def test_saved_state_dict_loads_and_gives_identical_outputs(weights_file, random_state):
    model = load_vgg16(str(weights_file))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, random_state[k])
    reference = VGG16Features()
    reference.load_state_dict({k: random_state[k] for k in reference.state_dict()})
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        for a, b in zip(model(x), reference(x)):
            assert torch.equal(a, b)


def test_gradients_flow_to_input_not_weights(weights_file):
    model = load_vgg16(weights_file, layers=("relu2_2",))
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    model(x)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_truncated_model_loads_full_file(weights_file, random_state):
    model = load_vgg16(weights_file, layers=("relu1_2",))
    assert torch.equal(model.features[2].weight, random_state["features.2.weight"])


def test_wrong_shape_names_file_and_key(tmp_path, random_state):
    bad = dict(random_state)
    bad["features.7.weight"] = torch.zeros(128, 64, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as info:
        load_vgg16(path)
    msg = str(info.value)
    assert "features.7.weight" in msg and str(path) in msg


def test_missing_key_and_bn_layout_rejected(tmp_path, random_state):
    bad = {k: v for k, v in random_state.items() if k != "features.10.bias"}
    bad["features.1.weight"] = torch.zeros(64)  # vgg16_bn-style key
    path = tmp_path / "bn.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as info:
        load_vgg16(path)
    assert "features.10.bias" in str(info.value) and "features.1.weight" in str(info.value)


def test_corrupt_file_is_checkpoint_error(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_vgg16(path)


def test_missing_file_names_path_and_fetch_command(tmp_path):
    path = tmp_path / "nowhere" / "vgg16-397923af.pth"
    with pytest.raises(GalcfError) as info:
        load_vgg16(path)
    msg = str(info.value)
    assert str(path) in msg and "weights fetch" in msg and "model.vgg_weights" in msg


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache: $TORCH_HOME points into tmp_path."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_hub_cache_path_honours_torch_home(torch_home):
    assert cached_vgg16_path() == torch_home / "hub" / "checkpoints" / VGG16_FILENAME


def test_random_weights_need_explicit_permission(torch_home):
    with pytest.raises(GalcfError, match="model.vgg_weights") as info:
        load_vgg16(None)
    msg = str(info.value)
    assert "model.vgg_random" in msg and "weights fetch" in msg and str(cached_vgg16_path()) in msg


def test_no_path_loads_the_hub_cache(torch_home, weights_file, random_state):
    cached = cached_vgg16_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights_file.read_bytes())
    model = load_vgg16(None, layers=("relu1_2",))
    assert torch.equal(model.features[2].weight, random_state["features.2.weight"])
    # random weights, when allowed, stay random even with a cached file (smoke runs reproducible)
    rnd = load_vgg16(None, layers=("relu1_2",), allow_random=True, seed=0)
    assert not torch.equal(rnd.features[2].weight, random_state["features.2.weight"])


def test_random_weights_warn_and_are_deterministic_per_seed(caplog):
    with caplog.at_level(logging.WARNING, logger="galcf_hpc"):
        a = load_vgg16(None, layers=("relu2_2",), allow_random=True, seed=1)
    assert any("RANDOM" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert all(not p.requires_grad for p in a.parameters()) and not a.training
    b = load_vgg16(None, layers=("relu2_2",), allow_random=True, seed=1)
    c = load_vgg16(None, layers=("relu2_2",), allow_random=True, seed=2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    # Random init does not touch the global RNG.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_vgg16(None, layers=("relu1_2",), allow_random=True, seed=7)
    assert torch.equal(torch.rand(3), expected)


# --- fetching -------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A local HTTP server on 127.0.0.1 serving a small file; yields (url, bytes)."""
    root = tmp_path / "www"
    root.mkdir()
    payload = bytes(range(256)) * 40
    (root / "weights.pth").write_bytes(payload)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", payload
    finally:
        server.shutdown()
        server.server_close()


def _files(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def local_file(tmp_path):
    """A small local file and its file:// URL; yields (url, bytes)."""
    payload = bytes(range(256)) * 40
    src = tmp_path / "src" / "weights.pth"
    src.parent.mkdir()
    src.write_bytes(payload)
    return src.as_uri(), payload


def test_fetch_unreachable_raises_and_leaves_no_file(tmp_path):
    out = tmp_path / "dl" / "vgg16.pth"
    with pytest.raises(GalcfError) as info:
        fetch_vgg16(out, url="http://127.0.0.1:9/x", timeout=5)
    msg = str(info.value)
    assert "internet" in msg and "curl" in msg and str(out) in msg
    assert not out.exists()
    assert _files(out.parent) == []


def test_fetch_sha_mismatch_raises_and_leaves_no_file(tmp_path, local_file):
    url, _ = local_file
    out = tmp_path / "vgg16.pth"
    out.write_bytes(b"previous")  # an existing file survives a failed fetch
    with pytest.raises(GalcfError, match="sha256sum") as info:
        fetch_vgg16(out, url=url)
    assert weights.VGG16_SHA256_PREFIX in str(info.value) and str(out) in str(info.value)
    assert out.read_bytes() == b"previous"
    assert _files(tmp_path) == ["src", "vgg16.pth"]  # no .partial file left


def test_fetch_http_error_leaves_no_file(tmp_path, served):
    url, _ = served
    out = tmp_path / "out" / "vgg16.pth"
    with pytest.raises(GalcfError, match="404"):
        fetch_vgg16(out, url=f"{url}/missing.pth", timeout=5)
    assert _files(out.parent) == []


def test_fetch_matching_prefix_writes_file(tmp_path, served, monkeypatch):
    url, payload = served
    monkeypatch.setattr(weights, "VGG16_SHA256_PREFIX", hashlib.sha256(payload).hexdigest()[:8])
    out = tmp_path / "out" / "weights.pth"
    got = fetch_vgg16(out, url=f"{url}/weights.pth", timeout=5)
    assert got == str(out)
    assert out.read_bytes() == payload
    assert _files(out.parent) == ["weights.pth"]
    # An existing directory as target: torchvision's file name inside it.
    got = fetch_vgg16(out.parent, url=f"{url}/weights.pth", timeout=5)
    assert got.endswith(VGG16_FILENAME)


def test_fetch_default_destination_is_the_hub_cache(torch_home, local_file, monkeypatch):
    url, payload = local_file
    monkeypatch.setattr(weights, "VGG16_SHA256_PREFIX", hashlib.sha256(payload).hexdigest()[:8])
    got = fetch_vgg16(url=url)
    assert got == str(torch_home / "hub" / "checkpoints" / VGG16_FILENAME)
    assert cached_vgg16_path().read_bytes() == payload


def test_weights_fetch_command_without_internet(tmp_path, monkeypatch, capsys):
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = tmp_path / "w" / VGG16_FILENAME
    assert main(["weights", "fetch", "--out", str(out)]) == DataError.exit_code
    err = capsys.readouterr().err
    assert "no internet" in err and "login node" in err and str(out) in err and "Traceback" not in err
    assert calls == [(weights.VGG16_URL, weights.VGG16_SHA256_PREFIX)]
    assert not out.exists()
