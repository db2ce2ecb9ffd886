"""Plain PyTorch loader back-end and the augmentation."""

import numpy as np
import pytest
import torch

from galcf_hpc.data.shards import read_index, read_manifest
from galcf_hpc.errors import CheckpointError, DataError
from galcf_hpc.loaders.augment import augment_batch, reduced_size, sample_angles, warp_batch
from galcf_hpc.loaders.torch import ShardDataset, build_torch_loader


def _split_keys(split_dir):
    manifest = read_manifest(split_dir)
    return [s["key"] for shard in manifest["shards"] for s in read_index(split_dir / shard["idx"]["file"])]


def _epoch(loader):
    return list(loader)


def _tent_resize_reference(images, crop_fraction, image_size):
    """Crop box + tent-filter resampling written out pixel by pixel in numpy (float64):
    independent of augment.py's matrix form."""
    size = images.shape[1]
    side = int(round(size * crop_fraction))
    anchor = (size - side) // 2
    scale = side / image_size
    radius = max(1.0, scale)
    weights = np.zeros((image_size, size))
    for j in range(image_size):
        centre = anchor + (j + 0.5) * scale - 0.5
        for i in range(size):
            weights[j, i] = max(0.0, 1.0 - abs(i - centre) / radius)
        weights[j] /= weights[j].sum()
    out = np.einsum("rh,bhwc,sw->bcrs", weights, images.astype(np.float64) / 255, weights)
    return torch.from_numpy(out).float()


def _reference_eval_images(catalog, keys, image_size, crop_fraction):
    return _tent_resize_reference(catalog.images[[int(k[1:]) for k in keys]], crop_fraction, image_size)


def test_batch_contract(sharded):
    loader = build_torch_loader(sharded.out / "train", batch_size=8, image_size=24)
    batch = next(iter(loader))
    images, labels, keys = batch["images"], batch["labels"], batch["keys"]
    assert images.dtype == torch.float32 and images.shape == (8, 3, 24, 24)
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.3
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    assert isinstance(keys, list) and all(isinstance(k, str) for k in keys) and len(set(keys)) == 8
    assert labels.tolist() == [int(sharded.catalog.labels[int(k[1:])]) for k in keys]
    assert "valid" not in batch
    assert len(loader) == loader.steps_per_epoch == len(_split_keys(sharded.out / "train")) // 8


@pytest.mark.parametrize("fmt", ["png", "jp2"])
def test_dataset_returns_exact_pixels(sharded, sharded_as, fmt):
    ds = ShardDataset(sharded_as(fmt) / "val")
    for i in (0, len(ds) - 1):
        sample = ds[i]
        assert np.array_equal(sample["image"], sharded.catalog.images[int(sample["key"][1:])])
        assert sample["label"] == sharded.catalog.labels[int(sample["key"][1:])]


@pytest.mark.parametrize("train", [False, True])
def test_without_augmentation_is_crop_and_resize(sharded, train):
    loader = build_torch_loader(
        sharded.out / "val", batch_size=5, image_size=16, train=train, augment=False, crop_fraction=0.7
    )
    first, second = _epoch(loader), _epoch(loader)
    for a, b in zip(first, second):
        assert a["keys"] == b["keys"] or train  # training reshuffles per epoch
        expected = _reference_eval_images(sharded.catalog, a["keys"], 16, 0.7)
        assert torch.allclose(a["images"], expected, atol=1e-6)
    if not train:
        assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, second))


def test_rotation_angles_cover_the_range_and_are_used(sharded):
    keys = [f"g{i:07d}" for i in range(4000)]
    angles = sample_angles(keys, seed=0, epoch=0, rotation_degrees=45.0)
    assert angles.min() >= -45 and angles.max() <= 45
    assert angles.min() < -44.5 and angles.max() > 44.5
    assert np.histogram(angles.numpy(), bins=6, range=(-45, 45))[0].min() > 4000 / 6 * 0.85
    assert not torch.equal(angles, sample_angles(keys, seed=0, epoch=1, rotation_degrees=45.0))
    assert torch.equal(angles, sample_angles(keys, seed=0, epoch=0, rotation_degrees=45.0))

    loader = build_torch_loader(sharded.out / "train", batch_size=4, image_size=20, rotation_degrees=45.0)
    loader.set_epoch(3)
    batch = next(iter(loader))
    ds = loader.dataset
    raw = torch.from_numpy(np.stack([ds[ds.keys.index(k)]["image"] for k in batch["keys"]]))
    expected = augment_batch(raw, 20, 0.7, sample_angles(batch["keys"], 0, 3, 45.0))
    assert torch.equal(batch["images"], expected)
    assert not torch.allclose(batch["images"], augment_batch(raw, 20, 0.7), atol=1e-2)


def test_warp_turns_counter_clockwise_about_the_centre():
    image = (torch.rand(1, 16, 16, 3) * 255).to(torch.uint8)
    as_float = image.permute(0, 3, 1, 2).float() / 255
    # Without crop and scale a 90 degree turn maps pixel centres onto pixel centres: it equals
    # np.rot90 (which turns counter-clockwise as displayed, row 0 at the top).
    turned = warp_batch(image, 16, 1.0, torch.tensor([90.0]))
    assert torch.allclose(turned, torch.rot90(as_float, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(warp_batch(image, 16, 1.0, torch.tensor([0.0])), as_float, atol=1e-5)
    dot = torch.zeros(1, 15, 15, 3, dtype=torch.uint8)
    dot[0, 7, 11] = 255  # right of centre
    moved = warp_batch(dot, 15, 1.0, torch.tensor([90.0]))[0, 0]
    assert divmod(int(moved.argmax()), 15) == (3, 7)  # now above the centre


@pytest.mark.parametrize("size,image_size", [(64, 16), (60, 32), (64, 64)])
def test_warp_is_crop_and_resize_at_angle_zero_and_equivariant(size, image_size):
    """At angle 0 the one-resampling warp is the evaluation transform up to the bilinear
    sampling of the reduced cutout; a quarter turn of the cutout is a quarter turn of the
    output; the reduction antialiases (a pixel-wide checkerboard averages to grey)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    blob = 230 * torch.exp(-((xx - size * 0.55) ** 2 / (size * 0.9) + (yy - size * 0.45) ** 2 / (size * 0.3)))
    image = torch.stack([blob, blob * 0.6, blob * 0.3], -1)[None].round().to(torch.uint8)
    zero = warp_batch(image, image_size, 0.7, torch.tensor([0.0]))
    assert zero.shape == (1, 3, image_size, image_size)
    assert float((zero - augment_batch(image, image_size, 0.7)).abs().mean()) < 0.01
    side = round(size * 0.7)
    assert reduced_size(size, image_size, 0.7) == (size if image_size >= side else round(size * image_size / side))
    turned = torch.rot90(image, 1, dims=(1, 2)).contiguous()  # the cutout a quarter turn on
    assert float((warp_batch(turned, image_size, 0.7, torch.tensor([-90.0])) - zero).abs().max()) < 0.02
    assert float((warp_batch(image, image_size, 0.7, torch.tensor([90.0])) - zero).abs().mean()) > 0.01
    checker = ((xx + yy) % 2 * 255).to(torch.uint8)[None, :, :, None].expand(1, size, size, 3).contiguous()
    grey = warp_batch(checker, image_size, 0.7, torch.tensor([33.0]))[..., 2:-2, 2:-2]
    if image_size < side:  # shrunk: the reduction's tent filter averages the checkerboard
        assert float((grey - 0.5).abs().max()) < 0.1


def _run_ranks(split_dir, world, train, batch_size=4, epoch=0):
    per_rank = []
    for rank in range(world):
        loader = build_torch_loader(
            split_dir, batch_size=batch_size, image_size=8, rank=rank, world_size=world, train=train, augment=False
        )
        loader.set_epoch(epoch)
        per_rank.append((loader.steps_per_epoch, _epoch(loader)))
    return per_rank


@pytest.mark.parametrize("world", [2, 3])
def test_training_ranks_are_disjoint_and_equal(sharded, world):
    split_keys = _split_keys(sharded.out / "train")  # 4 uneven shards (50, 50, 50, rest)
    per_rank = _run_ranks(sharded.out / "train", world, train=True, epoch=1)
    assert {steps for steps, _ in per_rank} == {len(batches) for _, batches in per_rank} == {per_rank[0][0]}
    rank_keys = [[k for b in batches for k in b["keys"]] for _, batches in per_rank]
    union = set().union(*map(set, rank_keys))
    assert sum(len(k) for k in rank_keys) == len(union)  # disjoint, no repeats
    assert union <= set(split_keys)
    assert 0 <= len(split_keys) - len(union) < world * 4
    other_epoch = _run_ranks(sharded.out / "train", world, train=True, epoch=2)
    assert [b["keys"] for b in other_epoch[0][1]] != [b["keys"] for b in per_rank[0][1]]


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_sees_every_sample_once(sharded, world):
    split_keys = _split_keys(sharded.out / "train")
    per_rank = _run_ranks(sharded.out / "train", world, train=False, batch_size=8)
    assert len({len(batches) for _, batches in per_rank}) == 1
    assert all(len(batches) == steps for steps, batches in per_rank)
    valid_keys = []
    for _, batches in per_rank:
        for b in batches:
            assert b["valid"].dtype == torch.bool and b["images"].shape[0] == 8
            valid_keys += [k for k, v in zip(b["keys"], b["valid"].tolist()) if v]
    assert sorted(valid_keys) == sorted(split_keys)
    padded = sum(int((~b["valid"]).sum()) for _, batches in per_rank for b in batches)
    assert padded == per_rank[0][0] * 8 * world - len(split_keys)


def test_state_dict_resumes_mid_epoch(sharded, tmp_path):
    def make():
        return build_torch_loader(sharded.out / "train", batch_size=8, image_size=12, seed=4)

    reference = make()
    reference.set_epoch(2)
    full = _epoch(reference)

    loader = make()
    loader.set_epoch(2)
    it = iter(loader)
    seen = [next(it) for _ in range(3)]
    path = tmp_path / "state.pt"
    torch.save(loader.state_dict(), path)
    assert [b["keys"] for b in seen] == [b["keys"] for b in full[:3]]

    resumed = make()
    resumed.load_state_dict(torch.load(path, weights_only=True))
    resumed.set_epoch(2)  # the training loop's call must not restart the epoch
    rest = _epoch(resumed)
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[3:]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(rest, full[3:]))
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["step"] == 0

    other = build_torch_loader(sharded.out / "train", batch_size=4, image_size=12, seed=4)
    with pytest.raises(CheckpointError, match="batch_size"):
        other.load_state_dict(torch.load(path, weights_only=True))


def test_workers_give_identical_batches(sharded):
    kwargs = dict(batch_size=16, image_size=16, rotation_degrees=180.0, seed=7)
    serial = build_torch_loader(sharded.out / "train", num_workers=0, **kwargs)
    parallel = build_torch_loader(sharded.out / "train", num_workers=2, **kwargs)
    for epoch in (0, 1):  # the second epoch runs on the same persistent workers
        serial.set_epoch(epoch)
        parallel.set_epoch(epoch)
        a, b = _epoch(serial), _epoch(parallel)
        assert len(a) == len(b) == serial.steps_per_epoch
        for x, y in zip(a, b):
            assert x["keys"] == y["keys"]
            assert torch.equal(x["labels"], y["labels"]) and torch.equal(x["images"], y["images"])


def test_missing_split_or_manifest(sharded_copy, tmp_path):
    with pytest.raises(DataError, match="nowhere: split directory does not exist"):
        build_torch_loader(tmp_path / "nowhere", batch_size=4, image_size=8)
    (sharded_copy / "val" / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"val/manifest\.json: manifest is missing.*galcf-hpc data verify"):
        build_torch_loader(sharded_copy / "val", batch_size=4, image_size=8)


def test_truncated_tar_is_named(sharded_copy):
    tar_path = sharded_copy / "train" / "shard-000002.tar"
    tar_path.write_bytes(tar_path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"shard-000002\.tar: shard is missing or its size.*galcf-hpc data verify"):
        build_torch_loader(sharded_copy / "train", batch_size=4, image_size=8)


@pytest.mark.parametrize("fmt", ["png", "jpg", "jp2"])
def test_corrupt_image_names_shard_and_sample(sharded_copy_as, patch_member, fmt):
    split_dir = sharded_copy_as(fmt) / "test"
    key = patch_member(split_dir / "shard-000000.tar", 1, fmt, lambda data: bytes(len(data)))
    ds = ShardDataset(split_dir)
    ds[0]
    with pytest.raises(DataError, match=rf"shard-000000\.tar: sample {key} image cannot be decoded"):
        ds[1]


def test_stale_index_is_caught_at_read_time(sharded_copy):
    split_dir = sharded_copy / "val"
    idx_path = split_dir / "shard-000000.idx"
    lines = idx_path.read_text().splitlines()
    # Sample 0 now claims sample 1's name while still pointing at sample 0's member.
    lines[1] = lines[1].replace(lines[1].split()[3], lines[2].split()[3])
    idx_path.write_text("\n".join(lines) + "\n")
    ds = ShardDataset(split_dir)
    with pytest.raises(DataError, match="stale index"):
        ds[0]


def test_too_few_samples_for_a_training_batch(sharded):
    n = read_manifest(sharded.out / "val")["num_samples"]
    with pytest.raises(DataError, match="lower the batch size"):
        build_torch_loader(sharded.out / "val", batch_size=n, image_size=8, world_size=2)


def _set_label(tar_path, sample_no, label):
    """Rewrite one sample's .cls member (and the index) to ``label`` (bytes); its key."""
    import tarfile

    from galcf_hpc.data import shards

    samples = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, []).append((ext, tar.extractfile(member).read()))
    key = list(samples)[sample_no]
    samples[key] = [(ext, label if ext == "cls" else data) for ext, data in samples[key]]
    rows = shards._write_tar(tar_path, list(samples.items()))
    tar_path.with_suffix(".idx").write_text(shards.format_index(rows))
    return key


def test_label_outside_the_classes_names_shard_and_sample(sharded_copy):
    """A shard rewritten with label 10 for one sample: a data error naming shard and sample
    before any loss sees it (not an IndexError inside the loss)."""
    split_dir = sharded_copy / "test"
    key = _set_label(split_dir / "shard-000000.tar", 1, b"10")
    ds = ShardDataset(split_dir)
    ds[0]
    with pytest.raises(DataError, match=rf"shard-000000\.tar: sample {key} has label b'10', not a class 0-9"):
        ds[1]


def test_training_refuses_a_label_out_of_range_before_step_1(sharded_copy, tmp_path, capsys):
    """A .cls member changed after sharding (the manifest's counts say nothing about it) is
    found before the first step, on whatever rank reads it: no checkpoint, no config.yaml."""
    from galcf_hpc.cli import main
    from galcf_hpc.config import dump_config
    from test_train import tiny_config

    shard = sorted((sharded_copy / "train").glob("shard-*.tar"))[-1]
    key = _set_label(shard, 5, b"11")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(dump_config(tiny_config(sharded_copy, tmp_path / "run", epochs=1)))
    assert main(["train", "--config", str(cfg_path)]) == DataError.exit_code
    err = capsys.readouterr().err
    assert f"{shard}: sample {key} has label b'11', not a class 0-9" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.yaml").exists()
