"""Training a quantized model: how one batch, one epoch and one search run.

* ``losses`` and ``steps``: pure loss terms and the ``make_*`` step functions (float, selected
  bits, bit mixture, bit-meta) under ``tf.distribute``.
* ``trainer``: the epoch loop (checkpoints, resume, logs); ``loop``: its settings.
* ``searchers`` and ``search_rules``: MetaMix, the joint (DNAS-style) and the uniform searcher,
  and the settings that both searchers share.
* ``distribute``: strategies and multi-worker run directories.
"""
