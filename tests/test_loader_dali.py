"""DALI back-end (CPU mode, device_id=None) against the torch back-end, and the synthetic back-end."""

import numpy as np
import pytest
import torch

from galcf_hpc.config import config_from_dict
from galcf_hpc.data.shards import read_index, read_manifest
from galcf_hpc.errors import CheckpointError, ConfigError, DataError
from galcf_hpc.loaders import build_loader
from galcf_hpc.loaders.augment import augment_batch, resize_weights
from galcf_hpc.loaders.dali import DaliLoader, rank_range
from galcf_hpc.loaders.synthetic import SyntheticLoader
from galcf_hpc.loaders.torch import ShardDataset, build_torch_loader

pytest.importorskip("nvidia.dali")

TOL = 1 / 255


def _split_keys(split_dir):
    manifest = read_manifest(split_dir)
    return [s["key"] for shard in manifest["shards"] for s in read_index(split_dir / shard["idx"]["file"])]


def _dali(split_dir, **kw):
    kw = {"batch_size": 8, "image_size": 16, "num_threads": 2, **kw}
    return DaliLoader(split_dir, **kw)


def _by_key(batches):
    out = {}
    for b in batches:
        valid = b.get("valid", torch.ones(len(b["keys"]), dtype=torch.bool))
        for key, image, label, v in zip(b["keys"], b["images"], b["labels"], valid.tolist()):
            if v:
                assert key not in out, f"{key} twice in one epoch"
                out[key] = (image, int(label))
    return out


def test_batch_contract(sharded):
    loader = _dali(sharded.out / "train", image_size=24, seed=2)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch == len(_split_keys(sharded.out / "train")) // 8
    b = batches[0]
    assert b["images"].dtype == torch.float32 and b["images"].shape == (8, 3, 24, 24)
    assert b["images"].device.type == "cpu" and b["images"].is_contiguous()
    assert b["labels"].dtype == torch.int64 and b["labels"].shape == (8,)
    assert b["labels"].tolist() == [int(sharded.catalog.labels[int(k[1:])]) for k in b["keys"]]
    images = torch.cat([x["images"] for x in batches])
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.3
    assert "valid" not in b and loader.position == 0 and loader.epoch == 1


@pytest.mark.parametrize("fmt, train", [("png", False), ("png", True), ("jpg", False), ("jp2", False)])
def test_equals_torch_backend_without_augmentation(sharded, sharded_as, fmt, train):
    """Same shards, no augmentation: the same keys per epoch (evaluation: the whole split;
    training: no repeats and the same count) and images equal within 1/255, for every image
    format (DALI's decoders against Pillow's)."""
    split = sharded_as(fmt) / "val"
    dali = _by_key(_dali(split, batch_size=5, image_size=20, train=train, augment=False, crop_fraction=0.7))
    ref = _by_key(build_torch_loader(split, batch_size=5, image_size=20, train=train, augment=False, crop_fraction=0.7))
    if train:
        assert len(dali) == len(ref) and set(dali) <= set(_split_keys(split))
    else:
        assert set(dali) == set(ref) == set(_split_keys(split))
    dataset = ShardDataset(split)
    where = {k: i for i, k in enumerate(dataset.keys)}
    worst = 0.0
    for key, (image, label) in dali.items():
        expected = (
            ref[key][0]
            if key in ref
            else augment_batch(torch.from_numpy(dataset[where[key]]["image"][None]), 20, 0.7)[0]
        )
        worst = max(worst, float((image - expected).abs().max()))
        assert label == int(sharded.catalog.labels[int(key[1:])])
    assert worst <= TOL, f"largest pixel difference {worst * 255:.3f}/255"


def test_upscaling_weights_are_bilinear():
    w = resize_weights(10, 2, 5, 15)
    assert torch.allclose(w.sum(1), torch.ones(15))
    x = torch.rand(1, 1, 10, 10)
    ours = torch.einsum("rh,bchw,sw->bcrs", w, x, w)
    ref = torch.nn.functional.interpolate(x[..., 2:7, 2:7], size=(15, 15), mode="bilinear", align_corners=False)
    assert torch.allclose(ours[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-6)  # inside the box


def test_rotation_angles_cover_the_range_and_match_torch_rotation(sharded):
    split = sharded.out / "train"
    loader = _dali(split, image_size=20, rotation_degrees=45.0, seed=5)
    batches = list(loader)
    angles = torch.cat([b["angles"] for b in batches])
    assert angles.abs().max() <= 45.0 and angles.min() < -36 and angles.max() > 36
    assert len(set(angles.tolist())) == len(angles)  # a fresh angle per sample
    dataset = ShardDataset(split)
    where = {k: i for i, k in enumerate(dataset.keys)}
    b = batches[0]
    raw = torch.from_numpy(np.stack([dataset[where[k]]["image"] for k in b["keys"]]))
    same = augment_batch(raw, 20, 0.7, b["angles"])
    assert float((b["images"] - same).abs().max()) <= 2 * TOL  # both reduce in uint8, then warp
    assert float((b["images"] - augment_batch(raw, 20, 0.7)).abs().mean()) > 4 * TOL
    assert float((b["images"] - augment_batch(raw, 20, 0.7, -b["angles"])).abs().mean()) > 4 * TOL
    again = list(_dali(split, image_size=20, rotation_degrees=45.0, seed=5))
    assert all(torch.equal(x["angles"], y["angles"]) and x["keys"] == y["keys"] for x, y in zip(batches, again))
    second_epoch = list(loader)
    assert [b["keys"] for b in second_epoch] != [b["keys"] for b in batches]


def _run_ranks(split_dir, world, train, batch_size, epochs=1):
    per_rank = []
    for rank in range(world):
        loader = _dali(
            split_dir, batch_size=batch_size, image_size=8, rank=rank, world_size=world, train=train, augment=False
        )
        per_rank.append((loader.steps_per_epoch, [list(loader) for _ in range(epochs)]))
    return per_rank


@pytest.mark.parametrize("world", [2, 3])
def test_training_ranks_are_disjoint_and_equal(sharded, world):
    split_keys = set(_split_keys(sharded.out / "train"))  # 4 uneven shards (50, 50, 50, rest)
    per_rank = _run_ranks(sharded.out / "train", world, train=True, batch_size=4, epochs=2)
    steps = per_rank[0][0]
    for epoch in range(2):
        keys = [[k for b in epochs[epoch] for k in b["keys"]] for _, epochs in per_rank]
        assert all(len(k) == steps * 4 for k in keys)  # equal step counts, full batches
        union = set().union(*map(set, keys))
        assert sum(len(k) for k in keys) == len(union) and union <= split_keys  # disjoint, no repeats
        assert 0 <= len(split_keys) - len(union) < world * 4 + world  # only the per-rank remainder is left
    first = {k for b in per_rank[0][1][0] for k in b["keys"]}
    second = {k for b in per_rank[0][1][1] for k in b["keys"]}
    assert first != second  # ranks move to another range each epoch


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_sees_every_sample_once(sharded, world):
    split_keys = _split_keys(sharded.out / "train")
    per_rank = _run_ranks(sharded.out / "train", world, train=False, batch_size=8)
    assert len({len(epochs[0]) for _, epochs in per_rank}) == 1
    valid_keys = []
    for rank, (steps, epochs) in enumerate(per_rank):
        assert len(epochs[0]) == steps
        rank_keys = [k for b in epochs[0] for k, v in zip(b["keys"], b["valid"].tolist()) if v]
        start, stop = rank_range(len(split_keys), rank, world)
        assert rank_keys == split_keys[start:stop]  # contiguous range in shard order
        valid_keys += rank_keys
    assert sorted(valid_keys) == sorted(split_keys)


def test_state_dict_resumes_mid_epoch_with_same_samples_and_angles(sharded, tmp_path):
    def make(**kw):
        return _dali(sharded.out / "train", image_size=12, seed=4, **kw)

    reference = make()
    full = list(reference) + list(reference)
    loader = make()
    it = iter(loader)
    [next(it) for _ in range(3)]
    path = tmp_path / "state.pt"
    torch.save(loader.state_dict(), path)
    resumed = make()
    resumed.load_state_dict(torch.load(path, weights_only=True))
    resumed.set_epoch(0)
    rest = list(resumed) + list(resumed)
    assert len(rest) == len(full) - 3
    for a, b in zip(rest, full[3:]):
        assert a["keys"] == b["keys"] and torch.equal(a["angles"], b["angles"])
        assert torch.equal(a["images"], b["images"])
    with pytest.raises(ValueError, match="cannot jump to epoch 5"):
        resumed.set_epoch(5)
    with pytest.raises(CheckpointError, match="batch_size"):
        _dali(sharded.out / "train", batch_size=4, image_size=12, seed=4).load_state_dict(
            torch.load(path, weights_only=True)
        )
    torch_loader = build_torch_loader(sharded.out / "train", batch_size=8, image_size=12, seed=4)
    with pytest.raises(CheckpointError, match="dali back-end"):
        torch_loader.load_state_dict(torch.load(path, weights_only=True))


def test_truncated_tar_and_stale_index_are_named(sharded_copy):
    tar_path = sharded_copy / "train" / "shard-000002.tar"
    tar_path.write_bytes(tar_path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"shard-000002\.tar: shard is missing or its size.*galcf-hpc data verify"):
        _dali(sharded_copy / "train")
    idx_path = sharded_copy / "val" / "shard-000000.idx"
    lines = idx_path.read_text().splitlines()
    lines[1] = lines[1].replace(lines[1].split()[3], lines[2].split()[3])
    idx_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"shard-000000\.idx: index differs .*stale index"):
        _dali(sharded_copy / "val")


_DAMAGE = {
    "zeros": lambda d: bytes(len(d)),
    "flipped byte": lambda d: d[:60] + bytes([d[60] ^ 0xFF]) + d[61:],  # PNG: a broken compressed stream
    # JPEG and JPEG 2000 decode a flipped byte inside their data to wrong pixels without an
    # error, in Pillow and DALI alike (docs/loaders.md); a broken signature fails both
    "signature": lambda d: bytes([d[0] ^ 0xFF]) + d[1:],
}


@pytest.mark.parametrize(
    "fmt, damage",
    [("png", "zeros"), ("png", "flipped byte"), ("jpg", "zeros"), ("jpg", "signature"), ("jp2", "signature")],
)
def test_corrupt_image_names_shard_and_sample(sharded_copy_as, patch_member, fmt, damage):
    split_dir = sharded_copy_as(fmt) / "test"
    key = patch_member(split_dir / "shard-000000.tar", 3, fmt, _DAMAGE[damage])
    with pytest.raises(DataError, match=rf"DALI stopped .*shard-000000\.tar: sample {key} image cannot be decoded"):
        list(_dali(split_dir, train=False, augment=False))


def _cfg(sharded, loader, **data):
    return config_from_dict(
        {
            "data": {"shards": str(sharded.out), "image_size": 16, "loader": loader, "device": "cpu", **data},
            "model": {"channels": [8, 16]},
            "train": {"batch_size": 8},
        }
    )


def test_config_selects_backends(sharded):
    assert isinstance(build_loader(_cfg(sharded, "dali"), "train"), DaliLoader)
    synthetic = build_loader(_cfg(sharded, "synthetic"), "train", rank=1, world_size=2)
    assert isinstance(synthetic, SyntheticLoader)
    with pytest.raises(ConfigError, match="data.loader.*must be one of torch, dali, synthetic, auto, got 'ffcv'"):
        _cfg(sharded, "ffcv")
    with pytest.raises(ConfigError, match="data.device"):
        _cfg(sharded, "dali", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            build_loader(_cfg(sharded, "dali", device="gpu"), "train")


def test_auto_picks_dali_on_a_gpu_and_says_why_not_elsewhere(sharded, monkeypatch, caplog):
    import galcf_hpc.loaders as loaders
    from galcf_hpc.loaders.torch import ShardLoader

    with caplog.at_level("INFO", logger="galcf_hpc.loaders"):
        loader = build_loader(_cfg(sharded, "auto", device="auto"), "train")
    if not torch.cuda.is_available():
        assert isinstance(loader, ShardLoader)
        assert "torch back-end, since no CUDA device is visible" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loaders, "_dali_installed", lambda: False)
    name, why = loaders.resolve_loader("auto", "auto")
    assert name == "torch" and "DALI is not installed" in why and "pip install" in why
    assert loaders.resolve_loader("auto", "cpu")[0] == "torch"
    monkeypatch.setattr(loaders, "_dali_installed", lambda: True)
    assert loaders.resolve_loader("auto", "auto") == ("dali", "data.loader auto: DALI on the GPU")
    assert loaders.resolve_loader("auto", "cpu") == (
        "torch",
        "data.loader auto: the torch back-end, since data.device is cpu",
    )
    assert loaders.resolve_loader("dali", "cpu")[0] == "dali"  # an explicit choice is kept


def test_synthetic_backend_contract_and_steps(sharded):
    cfg = _cfg(sharded, "synthetic")
    for world in (1, 3):
        loader = build_loader(cfg, "train", rank=world - 1, world_size=world)
        real = build_torch_loader(sharded.out / "train", batch_size=8, image_size=16, rank=world - 1, world_size=world)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch == real.steps_per_epoch
        b = batches[0]
        assert b["images"].shape == (8, 3, 16, 16) and b["images"].dtype == torch.float32
        assert 0 <= float(b["images"].min()) and float(b["images"].max()) <= 1
        assert b["labels"].dtype == torch.int64 and int(b["labels"].max()) < 10
        assert not torch.equal(batches[0]["images"], batches[1]["images"])
    evaluation = build_loader(cfg, "val", train=False, world_size=2)
    n_val = read_manifest(sharded.out / "val")["num_samples"]
    assert sum(int(b["valid"].sum()) for b in evaluation) == len(range(0, n_val, 2))
