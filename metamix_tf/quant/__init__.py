"""The quantization core: what a quantized Keras model computes.

* ``ops``: pure fake-quantization functions (LSQ forward and gradients, the bit mixture).
* ``quantizers``: Keras layers around them (activation quantizer with searchable bits,
  per-channel weight quantizer).
* ``layers``: quantized Conv2D / DepthwiseConv2D / Dense.
* ``graph_rules``: which tensors an int8 model stores (one table for ``apply`` and the export).
* ``canonical`` and ``flatten``: Keras graphs brought to the form the rules read (nested models
  inlined, separable convolutions split, activations separated).
* ``wrap``: ``apply(model)`` and the mode / bit switches.
* ``cost``: MACs and BitOPs.

Nothing here imports ``training``, ``export`` or ``analysis``.
"""
