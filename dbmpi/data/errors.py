"""The one error type of the data package, and the helper that names the file in its
message (shared by every module of ``dbmpi.data``)."""
from __future__ import annotations

__all__ = ["DatasetError", "dataset_error"]


class DatasetError(ValueError):
    """A problem with a data set file or source; the message names the file and the problem."""


def dataset_error(path, problem: str) -> DatasetError:
    """A ``DatasetError`` saying ``<path>: <problem>``."""
    return DatasetError(f"{path}: {problem}")
