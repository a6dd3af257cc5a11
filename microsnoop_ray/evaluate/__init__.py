"""Evaluation protocols of METHOD.md section 6 (pure functions on arrays)."""
from .metrics import knn_accuracy, knn_predict

__all__ = ["knn_accuracy", "knn_predict"]
