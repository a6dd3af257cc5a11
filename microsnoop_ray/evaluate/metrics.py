"""kNN accuracy with the vote rule of METHOD.md section 6."""
from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def knn_predict(X: np.ndarray, y: np.ndarray, k: int = 11, metric: str = "euclidean") -> np.ndarray:
    """Leave-one-out kNN predictions on the set itself.

    Vote rule: majority of the k nearest others; a tie between labels goes to the smallest
    label; when all k votes are distinct, the nearest neighbour's label wins. ``cosine``
    normalises the rows first (the reference forgot to).

    Parameters
    ----------
    X : ndarray (n, d)
    y : ndarray (n,) of sortable labels
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    if metric == "cosine":
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        metric = "euclidean"
    D = cdist(X, X, metric)
    np.fill_diagonal(D, np.inf)
    k = min(k, len(X) - 1)
    nn = np.argsort(D, axis=1, kind="stable")[:, :k]
    pred = np.empty(len(X), dtype=y.dtype)
    for i, idx in enumerate(nn):
        votes = y[idx]
        labels, counts = np.unique(votes, return_counts=True)  # labels sorted
        if counts.max() == 1 and k > 1:
            pred[i] = votes[0]
        else:
            pred[i] = labels[np.argmax(counts)]  # first maximum = smallest label among ties
    return pred


def knn_accuracy(X: np.ndarray, y: np.ndarray, k: int = 11, metric: str = "euclidean") -> dict:
    """Accuracy, per-class accuracy and macro F1 of leave-one-out kNN."""
    from sklearn.metrics import f1_score

    y = np.asarray(y)
    pred = knn_predict(X, y, k, metric)
    per_class = {str(c): float((pred[y == c] == c).mean()) for c in np.unique(y)}
    return {"accuracy": float((pred == y).mean()), "per_class": per_class,
            "macro_f1": float(f1_score(y, pred, average="macro")), "k": k, "metric": metric, "n": int(len(y))}
