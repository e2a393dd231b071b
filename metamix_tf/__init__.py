"""metamix_tf: MetaMix mixed-precision activation quantization for Keras 3.

Kim, Lee, Yoo, Kim, "MetaMix: Meta-state Precision Searcher for Mixed-precision Activation
Quantization", AAAI 2024 (arXiv 2311.06798).
"""

from metamix_tf.api import FinetuneResult, SearchResult, export_tflite, finetune, search
from metamix_tf.config import ExperimentConfig, QuantConfig
from metamix_tf.quant import ops
from metamix_tf.quant.cost import CostModel, layer_macs
from metamix_tf.quant.flatten import flatten
from metamix_tf.quant.layers import QuantConv2D, QuantDense, QuantDepthwiseConv2D
from metamix_tf.quant.quantizers import ActivationQuantizer, WeightQuantizer
from metamix_tf.quant.wrap import (
    activation_quantizers,
    apply,
    calibrate,
    enable_weight_quantization,
    get_bits,
    output_quantizers,
    quant_layers,
    select_bits,
    set_mode,
    set_uniform,
    variable_groups,
    weight_quantizers,
)
from metamix_tf.training.searchers import Joint, MetaMix, Searcher, Uniform

__version__ = "0.1.0"

__all__ = [
    "ActivationQuantizer",
    "CostModel",
    "ExperimentConfig",
    "FinetuneResult",
    "Joint",
    "MetaMix",
    "QuantConfig",
    "QuantConv2D",
    "QuantDense",
    "QuantDepthwiseConv2D",
    "SearchResult",
    "Searcher",
    "Uniform",
    "WeightQuantizer",
    "activation_quantizers",
    "output_quantizers",
    "apply",
    "calibrate",
    "enable_weight_quantization",
    "export_tflite",
    "finetune",
    "flatten",
    "get_bits",
    "layer_macs",
    "ops",
    "quant_layers",
    "search",
    "select_bits",
    "set_mode",
    "set_uniform",
    "variable_groups",
    "weight_quantizers",
]
