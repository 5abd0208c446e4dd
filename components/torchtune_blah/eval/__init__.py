"""Evaluation: answer extraction, llama-squad's metrics and the official SQuAD 2.0 metrics."""

from torchtune_blah.eval.metrics import (
    INVALID_PREDICTION,
    official_metrics,
    official_prediction,
    score_example,
    llama_squad_metrics,
)
from torchtune_blah.eval.parse import extract_answer

__all__ = ["INVALID_PREDICTION", "extract_answer", "official_metrics", "official_prediction", "score_example",
           "llama_squad_metrics"]
