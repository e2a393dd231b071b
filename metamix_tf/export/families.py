"""The keras.applications CNN families through ``apply()`` and the int8 export, one recipe
for the test (``tests/export/test_export_families.py``) and the benchmark
(``benchmarks/export_families.py``).

Recipe: the architecture with random weights (``weights=None``), 10 classes, logits (no
softmax), at a small input size; BatchNorm statistics set from one batch (so the random
network's activations are normalised, as a trained one's are); :func:`metamix_tf.apply`
with the default :class:`~metamix_tf.QuantConfig` (candidates {2, 3, 4, 8}, 4-bit weights,
8-bit first / last layers and output quantizers); LSQ calibration on one batch; random
bits per searchable quantizer; weight quantization on; biases snapped onto the int32 grid
(as the pipeline does after weight training); int8 export, verified against the Keras
model.
"""

from __future__ import annotations

import tempfile

import keras
import numpy as np

from metamix_tf.config import QuantConfig
from metamix_tf.export import graph, pool_steps, run
from metamix_tf.quant import wrap

__all__ = ["FAMILIES", "build_family", "images_for", "set_batch_norm_statistics",
           "quantize_at_random", "prepare", "export_quantized", "export_family"]

A = keras.applications
# name -> (constructor, input size, extra constructor arguments)
FAMILIES = {
    "MobileNet": (A.MobileNet, 32, {}),
    "MobileNetV2": (A.MobileNetV2, 32, {}),
    "MobileNetV3Small": (A.MobileNetV3Small, 32, {}),
    "MobileNetV3Large": (A.MobileNetV3Large, 32, {}),
    "EfficientNetB0": (A.EfficientNetB0, 32, {}),
    "EfficientNetV2B0": (A.EfficientNetV2B0, 32, {}),
    "ResNet50": (A.ResNet50, 32, {}),
    "ResNet50V2": (A.ResNet50V2, 32, {}),
    "DenseNet121": (A.DenseNet121, 32, {}),
    "Xception": (A.Xception, 71, {}),
    "InceptionV3": (A.InceptionV3, 75, {}),
    "InceptionResNetV2": (A.InceptionResNetV2, 75, {}),
    "NASNetMobile": (A.NASNetMobile, 32, {}),
    "VGG16": (A.VGG16, 32, {}),
    # LayerNormalization and GELU stay float islands (graph_rules.FLOAT_ISLANDS)
    "ConvNeXtTiny": (A.ConvNeXtTiny, 32, {}),
}
# Families whose preprocessing layers take raw [0, 255] pixels.
_RAW_PIXELS = ("MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0", "EfficientNetV2B0",
               "ConvNeXtTiny")


def build_family(name: str, num_classes: int = 10) -> keras.Model:
    """The float architecture of family ``name`` with random weights and a logits output.

    ConvNeXt's ``LayerScale`` factors start at 1e-6 in Keras (every block an identity, and
    the folded pointwise weights below the int8 weight scales the converter keeps); here
    they are set to 1, as a random-weight stand-in for a trained network's."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown family; known: {sorted(FAMILIES)}. Received: name={name!r}")
    ctor, size, extra = FAMILIES[name]
    model = ctor(input_shape=(size, size, 3), weights=None, classes=num_classes,
                 classifier_activation=None, **extra)
    for layer in model.layers:
        if type(layer).__name__ == "LayerScale":
            layer.gamma.assign(np.ones(layer.gamma.shape, np.float32))
    return model


def images_for(name: str, count: int, seed: int = 0) -> np.ndarray:
    """Smooth random images in the range the family's first layer expects."""
    size = FAMILIES[name][1]
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (count, 4, 4, 3))
    images = np.kron(coarse, np.ones((1, size // 4 + 1, size // 4 + 1, 1)))[:, :size, :size]
    images = np.clip(images + rng.normal(0, 0.2, images.shape), -1, 1)
    if name in _RAW_PIXELS:
        images = (images + 1) * 127.5
    return images.astype(np.float32)


def set_batch_norm_statistics(model: keras.Model, images: np.ndarray) -> None:
    """Moving mean / variance of every BatchNorm from one training-mode pass on ``images``.

    With random weights and Keras' initial statistics (mean 0, variance 1), deep networks'
    activations shrink layer after layer in inference mode (to about 1e-12 at MobileNetV2's
    logits), below the 1e-8 floor of LSQ step sizes; batch statistics keep every layer near
    unit scale, as in a trained network."""
    norms = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.momentum = 0.0
    model(images, training=True)
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum


def quantize_at_random(float_model: keras.Model, images: np.ndarray, seed: int = 0,
                       config: QuantConfig | None = None) -> tuple[keras.Model, dict]:
    """``float_model`` (random weights) with BatchNorm statistics from ``images``, wrapped,
    calibrated on ``images``, random bits from each quantizer's candidates, weights quantized,
    pooled-output steps and biases snapped; returns the wrapped model and the bits."""
    set_batch_norm_statistics(float_model, images)
    model = wrap.apply(float_model, config or QuantConfig())
    wrap.calibrate(model, images)
    rng = np.random.default_rng(seed)
    bits = {layer.name: int(rng.choice(layer.input_quantizer.candidate_bits))
            for layer in wrap.quant_layers(model)
            if layer.input_quantizer is not None and layer.input_quantizer.searchable}
    wrap.select_bits(model, bits)
    wrap.enable_weight_quantization(model)
    pool_steps.snap_pooled_steps(model)
    graph.snap_biases(model)
    return model, bits


def prepare(name: str, images: np.ndarray, seed: int = 0,
            config: QuantConfig | None = None) -> tuple[keras.Model, dict]:
    """The wrapped, calibrated model of family ``name`` (:func:`quantize_at_random`)."""
    keras.utils.set_random_seed(seed)
    return quantize_at_random(build_family(name), images, seed, config)


def export_quantized(model: keras.Model, name: str, calibration: np.ndarray,
                     images: np.ndarray, output_dir: str | None = None, formats=("int8",),
                     latency_rounds: int = 1, latency_runs: int = 3,
                     log=lambda _: None) -> dict:
    """Exports a model from :func:`quantize_at_random` and verifies it on ``images``;
    returns the export report with ``"family"`` and ``"float_layers"`` (weighted layers
    left float)."""
    with tempfile.TemporaryDirectory() as tmp:
        return run.export_model(
            model, output_dir or tmp, formats, name=name, calibration_data=calibration,
            eval_images=images, tensor_costs=False, latency_rounds=latency_rounds,
            latency_runs=latency_runs, log=log,
            report_extra={"family": name, "float_layers": wrap.unsupported_layers(model)})


def export_family(name: str, output_dir: str | None = None, examples: int = 64,
                  formats=("int8",), seed: int = 0, latency_rounds: int = 1,
                  latency_runs: int = 3, log=lambda _: None) -> dict:
    """Prepares family ``name`` (:func:`prepare`) and exports it (:func:`export_quantized`);
    the report also holds ``"bits"``."""
    calibration = images_for(name, 32, seed)
    model, bits = prepare(name, calibration, seed)
    report = export_quantized(model, name, calibration, images_for(name, examples, seed + 1),
                              output_dir, formats, latency_rounds, latency_runs, log)
    report["bits"] = bits
    return report
