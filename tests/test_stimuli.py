"""Stimulus sources and composition (mindvis.synthcortex.sources, mindvis.synthcortex.stimuli)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from mindvis.errors import ConfigError, DataError
from mindvis.synthcortex import sources
from mindvis.synthcortex import stimuli as stim


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def fake_objects(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Grey silhouettes on black whose shape depends on the class (ellipses of class-specific aspect/angle)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    ang = labels[:, None, None] * np.pi / 10
    a = 4 + labels[:, None, None] + rng.uniform(-1, 1, (n, 1, 1))
    b = 12 - 0.6 * labels[:, None, None]
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang)
    inside = (u / b) ** 2 + (v / a) ** 2 <= 1
    shade = rng.uniform(120, 255, (n, 1, 1))
    return (inside * shade).astype(np.uint8), labels.astype(np.uint8)


def write_fake_fashion_mnist(folder: Path, n_train: int = 400, n_test: int = 200) -> Path:
    """Write Fashion-MNIST-format IDX files (gzip) with class-dependent silhouettes."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        imgs, labs = fake_objects(n, seed)
        imgs[:, 0, 0] = 7 if prefix == "train" else 9  # marks the split of every object
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(_idx_bytes(imgs))
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(_idx_bytes(labs))
    return folder


def _clear_caches() -> None:
    sources._load_fashion_mnist.cache_clear()
    sources._load_animal_mnist.cache_clear()
    sources._load_image_folder.cache_clear()


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    folder = write_fake_fashion_mnist(tmp_path / "fmnist")
    monkeypatch.setenv("MINDVIS_FASHION_MNIST", str(folder))
    _clear_caches()
    yield folder
    _clear_caches()


def test_idx_loader_reads_both_splits(fake_fmnist):
    train = sources.load_objects("fashion-mnist", "train")
    test = sources.load_objects("fashion-mnist", "test")
    assert train.images.shape == (400, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (200, 28, 28)
    assert train.labels.dtype == np.int64 and set(np.unique(train.labels)) == set(range(10))
    assert train.class_names[0] == "T-shirt/top" and len(train.class_names) == 10
    # the split of each object comes from its own file
    assert (train.images[:, 0, 0] == 7).all() and (test.images[:, 0, 0] == 9).all()
    assert not train.images.flags.writeable


def test_idx_loader_rejects_corrupt_file(tmp_path, monkeypatch):
    folder = write_fake_fashion_mnist(tmp_path / "bad")
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    monkeypatch.setenv("MINDVIS_FASHION_MNIST", str(folder))
    _clear_caches()
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        sources.load_objects("fashion-mnist", "train")
    _clear_caches()


def test_missing_source_names_the_folder(tmp_path, monkeypatch):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    monkeypatch.setenv("MINDVIS_FASHION_MNIST", str(empty))
    _clear_caches()
    with pytest.raises(DataError) as info:
        sources.load_objects("fashion-mnist", "train")
    msg = str(info.value)
    assert str(empty) in msg and "MINDVIS_FASHION_MNIST" in msg and "\n" not in msg


def test_unknown_source_is_a_config_error():
    with pytest.raises(ConfigError, match="source"):
        stim.make_stimulus_set(4, source="imagenet-21k")


def test_make_stimulus_set_is_seeded_and_balanced(fake_fmnist):
    a, la, names = stim.make_stimulus_set(60, resolution=32, seed=3)
    b, lb, _ = stim.make_stimulus_set(60, resolution=32, seed=3)
    c, _, _ = stim.make_stimulus_set(60, resolution=32, seed=4)
    assert a.shape == (60, 32, 32, 3) and a.dtype == np.uint8
    assert la.dtype == np.int64 and la.shape == (60,)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert np.bincount(la, minlength=10).tolist() == [6] * 10
    assert names == list(sources.FASHION_MNIST_CLASSES)
    # every image has an object in a colour over a textured background: pixels vary within an image
    assert (a.reshape(60, -1, 3).std(axis=1).mean(axis=1) > 10).all()


def test_resolution_option(fake_fmnist):
    imgs, _, _ = stim.make_stimulus_set(5, resolution=96, seed=0)
    assert imgs.shape == (5, 96, 96, 3)
    with pytest.raises(ConfigError, match="resolution"):
        stim.make_stimulus_set(5, resolution=4)


def test_composition_places_object_where_it_says(fake_fmnist):
    bank = sources.load_objects("fashion-mnist", "train")
    empty = sources.ObjectBank(
        np.zeros_like(bank.images), bank.labels, bank.class_names, bank.source, bank.split
    )
    s = stim.compose(bank, np.arange(40), np.random.default_rng(0), resolution=64)
    bg = stim.compose(empty, np.arange(40), np.random.default_rng(0), resolution=64)
    assert s.images.shape == (40, 64, 64, 3) and s.shape.shape == (40, 49)
    for i in range(40):
        # same random draws: the difference to the object-free version is exactly the object
        diff = np.abs(s.images[i].astype(int) - bg.images[i].astype(int)).sum(axis=2) > 0
        ys, xs = np.nonzero(bank.images[i] > 0)
        box = s.scale[i] * 64
        ocx = 32 + s.center[i, 0] * 64 - box / 2 + (xs.mean() + 0.5) / 28 * box
        ocy = 32 - s.center[i, 1] * 64 - box / 2 + (ys.mean() + 0.5) / 28 * box
        yy, xx = np.nonzero(diff)
        assert np.hypot(xx.mean() + 0.5 - ocx, yy.mean() + 0.5 - ocy) < 2.0
        # the object covers about the area its silhouette predicts
        area = (bank.images[i] > 0).mean() * box**2
        assert 0.6 * area < diff.sum() < 1.6 * area


def test_shape_descriptor_ignores_position_and_colour(fake_fmnist):
    bank = sources.load_objects("fashion-mnist", "train")
    s1 = stim.compose(bank, np.arange(10), np.random.default_rng(1), 32)
    s2 = stim.compose(bank, np.arange(10), np.random.default_rng(2), 32)
    assert not np.array_equal(s1.images, s2.images)
    np.testing.assert_allclose(s1.shape, s2.shape)
    np.testing.assert_allclose(np.sqrt((s1.shape**2).mean(axis=1)), 1.0, rtol=1e-4)


def test_sample_objects_excludes_and_balances(fake_fmnist):
    bank = sources.load_objects("fashion-mnist", "train")
    rng = np.random.default_rng(0)
    first = stim.sample_objects(bank, 100, rng)
    second = stim.sample_objects(bank, 200, rng, exclude=first)
    assert len(np.unique(first)) == 100 and len(np.intersect1d(first, second)) == 0
    assert np.bincount(bank.labels[second], minlength=10).tolist() == [20] * 10


def test_texture_bank():
    bank = sources.load_texture_bank(128)
    assert bank.ndim == 4 and bank.shape[1:] == (128, 128, 3) and bank.shape[0] >= 8
    assert bank.dtype == np.float32 and bank.min() >= 0.0 and bank.max() <= 1.0


def _write_animal(folder: Path, n_per_class: int = 12) -> None:
    folder.mkdir(parents=True)
    imgs, _ = fake_objects(10 * n_per_class, 5)
    labels = np.repeat(np.arange(10), n_per_class).astype(np.int64)
    with gzip.open(folder / sources.ANIMAL_MNIST_FILES[0], "wb") as fh:
        pickle.dump(imgs, fh)
    with gzip.open(folder / sources.ANIMAL_MNIST_FILES[1], "wb") as fh:
        pickle.dump(labels, fh)


def test_animal_mnist_split_and_restricted_unpickling(tmp_path, monkeypatch):
    folder = tmp_path / "Animal_MNIST"
    _write_animal(folder)
    monkeypatch.setenv("MINDVIS_ANIMAL_MNIST", str(folder))
    _clear_caches()
    train = sources.load_objects("animal-mnist", "train")
    test = sources.load_objects("animal-mnist", "test")
    assert len(train) == 100 and len(test) == 20  # the last sixth of each class is the test split
    assert train.class_names[0] == "Bear"
    imgs, labels, names = stim.make_stimulus_set(10, resolution=32, source="animal-mnist", split="test")
    assert imgs.shape == (10, 32, 32, 3) and names[-1] == "Zebra"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with gzip.open(folder / sources.ANIMAL_MNIST_FILES[1], "wb") as fh:
        pickle.dump(Evil(), fh)
    _clear_caches()
    with pytest.raises(DataError, match="not allowed"):
        sources.load_objects("animal-mnist", "train")
    _clear_caches()


def test_image_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cats", "dogs"):
            d = tmp_path / "photos" / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    _clear_caches()
    imgs, labels, names = stim.make_stimulus_set(6, resolution=24, source=f"folder:{tmp_path / 'photos'}")
    assert imgs.shape == (6, 24, 24, 3) and names == ["cats", "dogs"]
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError):
        stim.make_stimulus_set(2, source=f"folder:{tmp_path / 'photos' / 'train' / 'cats'}x")
    # rendered into a given array (how the corpus file is written), a folder's photos land in it
    bank = sources.load_objects(f"folder:{tmp_path / 'photos'}", "train")
    out = np.zeros((4, 24, 24, 3), np.uint8)
    got = stim.compose(bank, np.arange(4), np.random.default_rng(0), resolution=24, out=out)
    assert got.images is out and out.std() > 20
    _clear_caches()
