"""Moved to `nvfp4kit.formats.weight_source` (a checkpoint format is a formats concern); this name stays until
quant/ imports it from there."""

from nvfp4kit.formats.weight_source import WeightSource as WeightSource
