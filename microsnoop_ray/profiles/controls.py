"""Which profiles are negative controls: the one rule every step (sphering, treatments, export, mAP) uses."""
from __future__ import annotations

import numpy as np
import pandas as pd

#: ``Metadata_pert_type`` values of negative controls: ``negcon`` (pycytominer, JUMP) and ``control`` (LINCS).
NEGCON_VALUES = ("negcon", "control")


def negative_controls(df: pd.DataFrame, column: str = "Metadata_pert_type") -> np.ndarray:
    """Boolean mask (n,) of the rows whose ``column`` is one of :data:`NEGCON_VALUES`.

    A table without the column has no negative controls (all False): controls are never guessed
    from compound names.
    """
    if column not in df:
        return np.zeros(len(df), bool)
    return df[column].isin(NEGCON_VALUES).to_numpy()
