"""Tests for metamix_tf.data: the embedded MNIST, image-folder and TFDS sources."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging

import numpy as np
import pytest
import tensorflow as tf

from metamix_tf import data
from metamix_tf.config import DataConfig


def _labels(ds):
    return np.concatenate([y for _, y in ds.as_numpy_iterator()])


def _write_image(path, side, seed, fmt="jpeg"):
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    encode = tf.io.encode_png if fmt == "png" else tf.io.encode_jpeg
    tf.io.write_file(str(path), encode(pixels))


def _make_tree(root, splits, classes=("cat", "dog", "emu"), per_class=4, side=20):
    for split, count in zip(splits, per_class if isinstance(per_class, tuple)
                            else (per_class,) * len(splits), strict=True):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                fmt = "png" if i == 0 else "jpeg"
                suffix = "png" if fmt == "png" else "jpg"
                _write_image(folder / f"{i:03d}.{suffix}", side, 100 * c + i, fmt)
    return root


@pytest.fixture(scope="module")
def mnist():
    return data.load(DataConfig(batch_size=64, eval_batch_size=128))


def test_mnist_shapes_dtypes_and_range(mnist):
    images, labels = next(iter(mnist.train))
    assert images.shape == (64, 32, 32, 3)
    assert images.dtype == tf.float32 and labels.dtype == tf.int32
    assert -1.0 <= float(tf.reduce_min(images)) < float(tf.reduce_max(images)) <= 1.0
    assert mnist.num_classes == 10 and mnist.class_names == [str(i) for i in range(10)]
    assert mnist.image_shape == (32, 32, 3)
    assert mnist.train_size + mnist.eval_size == 5000 and mnist.eval_size == 500
    assert "mnist_embedded" in mnist.name


def test_mnist_batches_and_split(mnist):
    sizes = [len(y) for _, y in mnist.train.as_numpy_iterator()]
    assert sizes == [64] * (mnist.train_size // 64)  # drop_remainder
    eval_labels = _labels(mnist.eval)
    assert len(eval_labels) == mnist.eval_size  # last partial batch kept
    np.testing.assert_array_equal(np.bincount(eval_labels), [50] * 10)  # stratified


def test_mnist_deterministic_and_reshuffled(mnist):
    one, two = (data.load(DataConfig(batch_size=64, eval_batch_size=128)) for _ in "12")
    np.testing.assert_array_equal(_labels(one.eval), _labels(mnist.eval))
    np.testing.assert_array_equal(_labels(two.eval), _labels(mnist.eval))
    first = next(iter(one.train))  # the same first epoch in every run ...
    np.testing.assert_array_equal(first[0].numpy(), next(iter(two.train))[0].numpy())
    first = first[1].numpy()
    assert not np.array_equal(first, next(iter(one.train))[1].numpy())  # ... then reshuffled
    other = data.load(DataConfig(batch_size=64, seed=1))
    assert not np.array_equal(next(iter(other.train))[1].numpy(), first)


def test_mnist_augmentation_translates_digits():
    config = DataConfig(batch_size=256, augment=False, max_train_examples=256)
    plain = next(iter(data.load(config).train))
    moved = next(iter(data.load(DataConfig(batch_size=256, max_train_examples=256)).train))
    np.testing.assert_array_equal(plain[1].numpy(), moved[1].numpy())
    diff = np.abs(plain[0].numpy() - moved[0].numpy()).max(axis=(1, 2, 3))
    assert 0.5 < np.mean(diff > 0) < 1.0  # most examples shift, (0, 0) offsets do not


def test_custom_preprocess_and_image_size():
    ds = data.load(DataConfig(batch_size=32), image_size=48, preprocess=lambda x: x / 255.0)
    for images, _ in (next(iter(ds.train)), next(iter(ds.eval))):
        assert images.shape[1:] == (48, 48, 3)
        assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) > 0.9
    assert ds.image_shape == (48, 48, 3)


def test_max_examples_gives_a_stratified_deterministic_subset():
    config = DataConfig(batch_size=20, max_train_examples=200, max_eval_examples=50)
    ds = data.load(config)
    assert (ds.train_size, ds.eval_size) == (200, 50)
    train = _labels(ds.train)
    assert len(train) == 200
    np.testing.assert_array_equal(np.bincount(train), [20] * 10)
    np.testing.assert_array_equal(np.bincount(_labels(ds.eval)), [5] * 10)
    np.testing.assert_array_equal(_labels(data.load(config).eval), _labels(ds.eval))


def test_folder_skips_bad_files_with_one_warning(tmp_path, caplog):
    root = _make_tree(tmp_path / "imgs", ("train", "test"), per_class=(4, 2))
    bad_dir = root / "train" / "dog"
    (bad_dir / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    (bad_dir / "empty.jpg").write_bytes(b"")
    good = (bad_dir / "001.jpg").read_bytes()
    (bad_dir / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (bad_dir / "notes.txt").write_text("not an image, ignored")
    config = DataConfig(dataset=f"folder:{root}", batch_size=4, eval_batch_size=4)
    with caplog.at_level(logging.WARNING):
        ds = data.load(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "corrupt" in r.getMessage()]
    assert len(warnings) == 1
    assert "Skipped 3" in warnings[0] and "empty.jpg" in warnings[0]
    assert "corrupt.jpg" in warnings[0] and "truncated.jpg" in warnings[0]
    assert ds.class_names == ["cat", "dog", "emu"] and ds.num_classes == 3
    assert (ds.train_size, ds.eval_size) == (12, 6)
    assert ds.image_shape == (20, 20, 3)
    assert "eval split 'test'" in ds.name
    np.testing.assert_array_equal(np.sort(_labels(ds.train)), np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(_labels(ds.eval), np.repeat([0, 1, 2], 2))
    images, _ = next(iter(ds.train))
    assert images.shape == (4, 20, 20, 3) and images.dtype == tf.float32


def test_folder_train_only_split_is_deterministic(tmp_path):
    root = _make_tree(tmp_path / "imgs", ("train",), per_class=10, side=16)
    config = DataConfig(dataset=f"folder:{root}", batch_size=8, validation_fraction=0.2)
    first, second = data.load(config), data.load(config)
    assert (first.train_size, first.eval_size) == (24, 6)
    eval_labels = _labels(first.eval)
    np.testing.assert_array_equal(eval_labels, _labels(second.eval))
    np.testing.assert_array_equal(np.bincount(eval_labels), [2, 2, 2])
    images, _ = next(iter(first.eval))
    np.testing.assert_array_equal(images.numpy(), next(iter(second.eval))[0].numpy())


def test_folder_large_images_stream(tmp_path):
    root = _make_tree(tmp_path / "big", ("train", "val"), per_class=(4, 2), side=80)
    (root / "train" / "cat" / "corrupt.jpg").write_bytes(b"\x00" * 64)
    good = (root / "train" / "cat" / "001.jpg").read_bytes()
    (root / "train" / "cat" / "truncated.jpg").write_bytes(good[:400])  # passes the magic
    config = DataConfig(dataset=f"folder:{root}", batch_size=4, eval_batch_size=5)
    ds = data.load(config)
    assert ds.image_shape == (224, 224, 3) and "eval split 'val'" in ds.name
    assert (ds.train_size, ds.eval_size) == (13, 6)  # the truncated file is dropped later
    batches = list(ds.train.as_numpy_iterator())
    assert [x.shape for x, _ in batches] == [(4, 224, 224, 3)] * 3
    np.testing.assert_array_equal(batches[0][0], next(iter(data.load(config).train))[0])
    assert [x.shape[1:] for x, _ in ds.eval.as_numpy_iterator()] == [(224, 224, 3)] * 2
    small = data.load(DataConfig(dataset=f"folder:{root}", batch_size=4), image_size=96)
    assert next(iter(small.train))[0].shape == (4, 96, 96, 3)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(DataConfig(dataset=f"folder:{tmp_path / 'nope'}"))
    with pytest.raises(FileNotFoundError, match="No 'train' folder"):
        data.load(DataConfig(dataset=f"folder:{tmp_path}"))
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="No JPEG/PNG/BMP/GIF images"):
        data.load(DataConfig(dataset=f"folder:{tmp_path}"))
    root = _make_tree(tmp_path / "mismatch", ("train", "test"), per_class=2)
    (root / "test" / "emu").rename(root / "test" / "owl")
    with pytest.raises(ValueError, match=r"missing: \['emu'\], extra: \['owl'\]"):
        data.load(DataConfig(dataset=f"folder:{root}", batch_size=2))


def test_tfds_mock_cifar10(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = DataConfig(dataset="cifar10", data_dir=str(tmp_path), batch_size=4,
                        eval_batch_size=5, max_eval_examples=7)
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load(config)
        images, labels = next(iter(ds.train))
        assert images.shape == (4, 32, 32, 3) and labels.dtype == tf.int32
        assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
        assert (ds.train_size, ds.eval_size) == (12, 7)
        assert len(_labels(ds.eval)) == 7
        assert "cifar10" in ds.name and "'test'" in ds.name
        streamed = data.load(config, image_size=72)  # > 64 px: streamed, random crops
        assert next(iter(streamed.train))[0].shape == (4, 72, 72, 3)
        assert [len(y) for _, y in streamed.eval.as_numpy_iterator()] == [5, 2]


def test_unknown_dataset_and_bad_config():
    with pytest.raises(ValueError, match="Received: dataset='no_such_dataset_xyz'"):
        data.load(DataConfig(dataset="no_such_dataset_xyz"))
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        data.load(DataConfig(batch_size=0))
    with pytest.raises(ValueError, match="Received: validation_fraction=1.5"):
        data.load(DataConfig(validation_fraction=1.5))
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.load(DataConfig(batch_size=64, max_train_examples=10))
