"""Image ops and batch pipelines of the in-memory and streamed sources.

In-memory sources (:class:`Arrays`, uint8, at most :data:`SMALL` px) are batched by a seeded
shuffle of indices and augmented on whole batches (pad + random crop, optional flip);
streamed ones (:class:`Stream`, file paths or encoded images) are decoded per example with a
random resized crop and flip for train, resize + center crop for eval. Every random choice
comes from stateless seeds derived from the config's seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from metamix_tf.config import DataConfig

__all__ = ["SMALL", "Arrays", "Stream", "fit", "pipeline", "to_uint8"]

AUTOTUNE = tf.data.AUTOTUNE
SMALL = 64  # largest side held in memory and augmented by pad + random crop
_SHUFFLE_MAX = 50_000
_ENCODED_SHUFFLE_MAX = 10_000  # buffer of encoded TFDS images (about 100 KB each)


@dataclasses.dataclass
class Arrays:
    images: np.ndarray  # uint8 [N, h, w, 3]
    labels: np.ndarray  # int32 [N]


@dataclasses.dataclass
class Stream:
    dataset: tf.data.Dataset  # (file path or encoded image: string, int32 label)
    size: int
    paths: bool  # True: elements hold file paths to read, False: encoded image bytes


# Image ops.

def to_uint8(images: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def fit(image: tf.Tensor, size: int, crop_fraction: float = 1.0) -> tf.Tensor:
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
        return to_uint8(resized)

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
    resized = to_uint8(tf.image.resize(crop, [size, size], antialias=True))
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

def pipeline(part: Arrays | Stream, *, training: bool, config: DataConfig, size: int,
              pad: int, flip: bool, preprocess: Callable | None) -> tf.data.Dataset:
    batch = config.batch_size if training else config.eval_batch_size
    augment = training and config.augment
    if isinstance(part, Arrays):
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


def _array_batches(part: Arrays, training: bool, augment: bool, batch: int, seed: int,
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


def _stream_batches(part: Stream, training: bool, augment: bool, batch: int, seed: int,
                    size: int, pad: int, flip: bool) -> tf.data.Dataset:
    """Per-example decode + transform of file paths or encoded images; undecodable
    (truncated) ones are dropped."""
    def decode(data):
        encoded = tf.io.read_file(data) if part.paths else data
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)

    def train_transform(data, label, s):
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(s, 2))
        image = decode(data)
        if size > SMALL:
            image = _random_resized_crop(image, size, crop_seed)
        else:
            image = tf.pad(fit(image, size), [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.stateless_random_crop(image, [size, size, 3], crop_seed)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return image, label

    def eval_transform(data, label):
        return fit(decode(data), size, 0.875 if size > SMALL else 1.0), label

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
