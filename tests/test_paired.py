"""The stage B paired dataset and its augmentations (image random crop, sparse voxel dropout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mindvis.data.dataset import FMRIDataset
from mindvis.data.paired import (
    PairedAugmentConfig,
    PairedFMRIDataset,
    check_image_sizes,
    images_to_tensor,
    random_crop,
    sparse_voxel_dropout,
)
from mindvis.errors import ConfigError, DataError
from mindvis.utils.images import resize_tensor


def _data(n=12, v=100, m=4, size=20, seed=0):
    rng = np.random.default_rng(seed)
    voxels = rng.normal(size=(n, v)).astype(np.float32) + 5.0  # no zeros before dropout
    images = rng.integers(0, 256, size=(m, size, size, 3), dtype=np.uint8)
    ids = rng.integers(0, m, size=n)
    labels = ids % 3
    return voxels, images, ids, labels


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.05])
def test_sparse_dropout_zeroes_expected_fraction(rate):
    torch.manual_seed(0)
    v = 1000
    x = torch.arange(1, v + 1, dtype=torch.float32)
    out = sparse_voxel_dropout(x, rate)
    assert int((out == 0).sum()) == int(rate * v)
    kept = out != 0
    assert torch.equal(out[kept], x[kept])  # the others are untouched
    assert torch.all(x != 0)  # the input is not modified in place
    # a new set of voxels on each call
    out2 = sparse_voxel_dropout(x, rate)
    assert not torch.equal(out == 0, out2 == 0)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_sparse_dropout_of_a_batch_chooses_per_sample(rate):
    gen = torch.Generator().manual_seed(0)
    v = 400
    x = torch.arange(1, v + 1, dtype=torch.float32).repeat(6, 1)
    out = sparse_voxel_dropout(x, rate, gen)
    assert out.shape == x.shape and torch.all(x != 0)  # the input is not modified in place
    assert ((out == 0).sum(dim=1) == int(rate * v)).all()  # exactly the fraction, in every row
    kept = out != 0
    assert torch.equal(out[kept], x[kept])
    assert len({tuple(row.nonzero().flatten().tolist()) for row in out == 0}) == len(x)  # own voxels per row


def test_sparse_rate_zero_is_the_original_behaviour():
    voxels, images, ids, labels = _data()
    ds = PairedFMRIDataset(voxels, images, ids, 16, augment=PairedAugmentConfig(sparse_rate=0.0, crop_p=0.0))
    for i in range(len(ds)):
        assert torch.equal(ds[i]["fmri"], torch.from_numpy(voxels[i]))


def test_dataset_drops_voxels_in_training_only():
    torch.manual_seed(1)
    voxels, images, ids, labels = _data(v=250)
    train = PairedFMRIDataset(voxels, images, ids, 16, labels=labels, train=True)
    test = PairedFMRIDataset(voxels, images, ids, 16, labels=labels, train=False)
    for i in range(len(train)):
        assert int((train[i]["fmri"] == 0).sum()) == int(0.2 * 250)
        assert torch.equal(test[i]["fmri"], torch.from_numpy(voxels[i]))


def test_random_crop_cuts_a_subsquare_with_probability_p():
    s = 50
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    img = torch.stack([yy, xx, yy * 0]).float()  # pixel values are their coordinates
    gen = torch.Generator().manual_seed(0)
    side = s - int(0.2 * s)
    cropped = 0
    trials = 400
    for _ in range(trials):
        out = random_crop(img, 0.2, 0.5, generator=gen)
        if out.shape[-1] == s:
            assert torch.equal(out, img)
            continue
        cropped += 1
        assert out.shape == (3, side, side)
        top, left = int(out[0, 0, 0]), int(out[1, 0, 0])
        assert torch.equal(out, img[:, top : top + side, left : left + side])
    # binomial(400, 0.5): mean 200, sd 10
    assert 150 < cropped < 250
    assert all(random_crop(img, 0.2, 0.0, generator=gen) is img for _ in range(10))
    assert all(random_crop(img, 0.2, 1.0, generator=gen).shape[-1] == side for _ in range(10))


def test_training_images_are_cropped_then_resized():
    torch.manual_seed(0)
    voxels, images, ids, labels = _data(size=40)
    always = PairedFMRIDataset(
        voxels, images, ids, 32, augment=PairedAugmentConfig(crop_p=1.0, sparse_rate=0)
    )
    never = PairedFMRIDataset(voxels, images, ids, 32, augment=PairedAugmentConfig(crop_p=0.0, sparse_rate=0))
    test = PairedFMRIDataset(voxels, images, ids, 32, train=False)
    for i in range(4):
        plain = resize_tensor(images_to_tensor(images[ids[i]]), 32)
        assert always[i]["image"].shape == (3, 32, 32)
        assert not torch.allclose(always[i]["image"], plain)
        assert torch.equal(never[i]["image"], plain)
        assert torch.equal(test[i]["image"], plain)
        assert test[i]["image"].min() >= -1 and test[i]["image"].max() <= 1


def test_item_layout_and_ground_truth():
    voxels, images, ids, labels = _data()
    ds = PairedFMRIDataset(voxels, images, ids, 16, labels=labels, train=False)
    item = ds[3]
    assert item["fmri"].shape == (100,) and item["fmri"].dtype == torch.float32
    assert item["image"].shape == (3, 16, 16)
    assert int(item["label"]) == labels[3] and int(item["index"]) == 3
    gt = ds.ground_truth()
    assert gt.shape == (12, 16, 16, 3) and gt.dtype == np.uint8
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["fmri"].shape == (5, 100) and batch["image"].shape == (5, 3, 16, 16)


def test_from_fmri_dataset():
    voxels, images, ids, labels = _data()
    fd = FMRIDataset(voxels=voxels, subject="s1", split="train", image_ids=ids, images=images, labels=labels)
    ds = PairedFMRIDataset.from_fmri_dataset(fd, 16, voxels=voxels * 2, train=False)
    assert torch.allclose(ds[0]["fmri"], torch.from_numpy(voxels[0] * 2))
    with pytest.raises(DataError, match="count mismatch"):
        PairedFMRIDataset.from_fmri_dataset(fd, 16, voxels=voxels[:5])
    unpaired = FMRIDataset(voxels=voxels, subject="s1", split="rest")
    with pytest.raises(DataError, match="no paired images"):
        PairedFMRIDataset.from_fmri_dataset(unpaired, 16)


def test_bad_input_errors():
    voxels, images, ids, labels = _data()
    with pytest.raises(DataError, match="count mismatch"):
        PairedFMRIDataset(voxels, images, ids[:-1], 16)
    with pytest.raises(DataError, match="empty"):
        PairedFMRIDataset(voxels[:0], images, ids[:0], 16)
    with pytest.raises(DataError, match="uint8"):
        PairedFMRIDataset(voxels, images.astype(np.float32), ids, 16)
    with pytest.raises(DataError, match="index"):
        PairedFMRIDataset(voxels, images, ids + 10, 16)
    bad = voxels.copy()
    bad[2, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        PairedFMRIDataset(bad, images, ids, 16)
    with pytest.raises(DataError, match="labels"):
        PairedFMRIDataset(voxels, images, ids, 16, labels=labels[:3])
    with pytest.raises(DataError, match="mixed sizes"):
        check_image_sizes([images[0], images[1][:10]])
    assert check_image_sizes(list(images)) == (20, 20)
    with pytest.raises(ConfigError):
        PairedAugmentConfig(sparse_rate=1.0)
    with pytest.raises(ConfigError):
        PairedAugmentConfig(crop_p=1.5)
    with pytest.raises(ConfigError):
        PairedAugmentConfig(crop_ratio=-0.1)
