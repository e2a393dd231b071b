"""Per-layer stability (metamix_tf.analysis.stability_layerwise): one layer at a time off its
bits."""

import numpy as np
from helpers import CANDIDATES, random_batch, tiny_net

from metamix_tf.analysis import stability, stability_layerwise
from metamix_tf.config import QuantConfig
from metamix_tf.quant import wrap


def _model():
    images = random_batch(n=32, seed=5)[0].numpy()
    model = wrap.apply(tiny_net(), QuantConfig(candidate_bits=CANDIDATES))
    wrap.calibrate(model, images)
    return model, images


def _searchable(model):
    return [layer.name for layer in wrap.quant_layers(model)
            if layer.input_quantizer is not None and layer.input_quantizer.searchable]


def test_per_layer_bits_at_one_width_equal_the_uniform_pass():
    model, images = _model()
    bits = {name: 4 for name in wrap.get_bits(model)}
    by_dict = stability._run_statistics(model, stability._Probe(model), images,
                                        {**wrap.get_bits(model), **dict.fromkeys(
                                            _searchable(model), 4)}, None)
    uniform = stability.activation_statistics(model, images, 4)
    assert by_dict.keys() == uniform.keys()
    for name in uniform:
        for key, value in uniform[name].items():
            assert by_dict[name][key] == value, (name, key)
    assert bits  # the model has quantized layers


def test_one_swap_moves_only_the_layers_downstream():
    model, images = _model()
    names = _searchable(model)
    bits = {**wrap.get_bits(model), **dict.fromkeys(names, 8)}
    result = stability_layerwise.layer_swap_shift(model, images, bits=bits, swap_bits=[2])
    rows = {r["layer"]: r for r in result["per_swap"]}
    assert set(rows) == set(names) and all(r["to_bits"] == 2 for r in rows.values())
    probe = stability._Probe(model)
    first, last = names[0], names[-1]
    down_first = stability_layerwise.downstream_entries(model, probe, first)
    down_last = stability_layerwise.downstream_entries(model, probe, last)
    assert first not in down_first and down_last < down_first
    # a swap shifts its downstream layers; the layers after the last searchable one
    # (the Dense head's input: BN and pooling sit before it) still see it
    assert rows[first]["input_var_shift"] > 0 and rows[first]["bn_mean_shift"] > 0
    assert rows[first]["num_input"] == len([n for n in down_first if n in names or
                                            n == "logits"])
    # the whole-model metric at 2 bits moves more than one layer at 2 bits, on average
    whole = stability.activation_shift(model, images, bits=[2], reference=8)["mean"][2]
    assert result["mean"]["bn_mean_shift"] < whole["bn_mean_shift"]
    # the modes are restored
    assert all(q.mode == layer.input_quantizer.mode for layer in wrap.quant_layers(model)
               for q in [layer.input_quantizer] if q is not None)


def test_a_layer_is_not_swapped_to_its_own_bits():
    model, images = _model()
    names = _searchable(model)
    bits = {**wrap.get_bits(model), **dict.fromkeys(names, 4)}
    result = stability_layerwise.layer_swap_shift(model, images, bits=bits)
    assert {(r["layer"], r["to_bits"]) for r in result["per_swap"]} == {
        (n, b) for n in names for b in CANDIDATES if b != 4}
    assert set(result["mean_by_bits"]) == {b for b in CANDIDATES if b != 4}
    assert all(np.isfinite(v) for v in result["mean"].values())
