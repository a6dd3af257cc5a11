"""Exceptions that carry the input they are about.

Every error raised for bad input names the plate, well, site or file and what
is wrong, so that a job can log it, put it in the ``skipped`` table, and go on.
"""
from __future__ import annotations


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
