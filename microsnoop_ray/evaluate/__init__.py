"""Evaluation protocols of docs/METHOD.md section 6 and the baselines they are compared with.

Pure functions on arrays and DataFrames:

* :func:`knn_accuracy`, :func:`mlp_accuracy`, :func:`silhouette`, :func:`centred_relative_error` (``metrics``)
* :func:`not_same_compound`, :func:`nsc_nscb`, :func:`treatment_batches` (``nsc``): BBBC021 NSC/NSCB
* :func:`activity_map`, :func:`consistency_map` (``mapping``): copairs mAP
* ``baselines``: microsnoop, random init, cp-measure and pixels-PCA features of the same crops
* ``suites``: the named benchmark suites; ``report``: one page with their last results
"""
from .mapping import activity_map, consistency_map
from .metrics import centred_relative_error, knn_accuracy, knn_predict, mlp_accuracy, silhouette
from .nsc import not_same_compound, nsc_nscb, treatment_batches

__all__ = ["centred_relative_error", "knn_accuracy", "knn_predict", "mlp_accuracy", "silhouette", "not_same_compound", "nsc_nscb",
           "treatment_batches", "activity_map", "consistency_map"]
