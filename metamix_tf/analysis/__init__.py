"""Analysis of quantized models, for studies and reports.

* ``stability``: activation and BatchNorm shifts when every searchable layer changes bits;
  ``stability_layerwise``: the same when one layer at a time does.
* ``evaluation``: BatchNorm re-estimation at fixed bits and per-image predictions.
* ``paired_bootstrap``: confidence intervals of accuracy differences, paired over images.
"""
