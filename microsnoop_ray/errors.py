"""Exceptions that carry the input they are about.

Every error raised for bad input names the plate, well, site or file and what
is wrong, so that a job can log it, put it in the ``skipped`` table, and go on.
"""
from __future__ import annotations

#: What a row of ``skipped.csv`` is about: a site that gave no profile, a cell left out of its site, a
#: field listed twice among the inputs, a plate-map row that matches no well. Only an InputError (or
#: one of these accountings) becomes such a row.
SKIP_KINDS = ("site not profiled", "cell left out", "duplicate field", "plate map")
SITE_NOT_PROFILED, CELL_LEFT_OUT, DUPLICATE_FIELD, PLATE_MAP = SKIP_KINDS


class MicrosnoopError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(MicrosnoopError, ValueError):
    """An input (file, array, plate, well, field) is unusable.

    Parameters
    ----------
    where : str
        What the input is: a path, or ``plate/well/site``.
    problem : str
        What is wrong with it, in words a user can act on.
    """

    def __init__(self, where: str, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


class WeightsError(InputError):
    """A weights file cannot be read or is not a Microsnoop checkpoint."""
