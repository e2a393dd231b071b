"""Analysis of quantized models: ``stability`` (activation and BatchNorm shifts as bits change)."""
