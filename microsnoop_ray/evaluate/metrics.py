"""kNN accuracy with the vote rule of docs/METHOD.md section 6."""
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


def mlp_accuracy(X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, max_iter: int = 1000,
                 hidden_layer_sizes: tuple = (100,), scale: bool = True) -> dict:
    """Stratified k-fold accuracy of ``MLPClassifier(max_iter=1000)`` (docs/METHOD.md section 6, BBBC048).

    With ``scale`` (default) the features are z-scored with the training folds' mean and SD before
    the classifier, as scikit-learn advises for MLPs: Microsnoop embeddings have variances of
    ~1e-5, at which an unscaled MLP predicts the majority class. ``scale=False`` gives them raw.

    Parameters
    ----------
    X : ndarray (n, d)
    y : ndarray (n,)
    folds : int
        Stratified folds; the smallest class must have at least ``folds`` members.

    Returns
    -------
    dict with ``accuracy`` (mean over folds), ``sd`` (population SD over folds), ``fold_accuracy``,
    ``macro_f1`` (of the pooled out-of-fold predictions), ``per_class`` and ``n``.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neural_network import MLPClassifier

    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    labels, counts = np.unique(y, return_counts=True)
    if counts.min() < folds:
        raise ValueError(f"class {labels[np.argmin(counts)]!r} has {counts.min()} member(s), "
                         f"fewer than the {folds} folds")
    pred = np.empty_like(y)
    accs = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        clf = MLPClassifier(hidden_layer_sizes=hidden_layer_sizes, max_iter=max_iter, random_state=seed)
        if scale:
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            clf = make_pipeline(StandardScaler(), clf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X[train], y[train])
        pred[test] = clf.predict(X[test])
        accs.append(float((pred[test] == y[test]).mean()))
    per_class = {str(c): float((pred[y == c] == c).mean()) for c in labels}
    return {"accuracy": float(np.mean(accs)), "sd": float(np.std(accs)), "fold_accuracy": accs,
            "macro_f1": float(f1_score(y, pred, average="macro")), "per_class": per_class,
            "folds": folds, "scaled": scale, "n": int(len(y))}


def silhouette(X: np.ndarray, y: np.ndarray, metric: str = "cosine") -> float:
    """Mean silhouette coefficient of the labelled groups (scikit-learn), in [-1, 1]."""
    from sklearn.metrics import silhouette_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        raise ValueError("silhouette needs at least two labels")
    return float(silhouette_score(np.asarray(X, np.float64), y, metric=metric))


def centred_relative_error(X: np.ndarray, reference: np.ndarray) -> float:
    """Median relative error of centred embeddings: how far reduced precision moves what profiles use.

    Each row of both sets minus its own set's mean, then ``||x_i - r_i|| / ||r_i||`` per row, the
    median over rows. Why not cosine: every embedding of a set shares one large component (the
    mean), so cosine to the reference reads 1.000 even when the part that tells cells apart has
    moved by 30 %; centring removes that component first.

    Parameters
    ----------
    X, reference : ndarray (n, d)
        The same cells, embedded two ways (``reference`` the trusted one, e.g. fp32).
    """
    X = np.asarray(X, np.float64)
    R = np.asarray(reference, np.float64)
    if X.shape != R.shape:
        raise ValueError(f"shapes differ: {X.shape} and {R.shape}")
    Xc, Rc = X - X.mean(axis=0), R - R.mean(axis=0)
    return float(np.median(np.linalg.norm(Xc - Rc, axis=1) / np.maximum(np.linalg.norm(Rc, axis=1), 1e-12)))
