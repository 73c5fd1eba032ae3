"""Accuracy of a quantized checkpoint against its reference: KL divergence, top-1 agreement, perplexity."""

from nvfp4kit.eval.compare import (
    EvalError,
    EvalReport,
    ReferenceLogits,
    checkpoint_bytes,
    compare_checkpoints,
    compare_models,
)
from nvfp4kit.eval.data import DEFAULT_DATA, EvalDataError, load_samples
from nvfp4kit.eval.metrics import Agreement, token_stats

__all__ = [
    "DEFAULT_DATA",
    "Agreement",
    "EvalDataError",
    "EvalError",
    "EvalReport",
    "ReferenceLogits",
    "checkpoint_bytes",
    "compare_checkpoints",
    "compare_models",
    "load_samples",
    "token_stats",
]
