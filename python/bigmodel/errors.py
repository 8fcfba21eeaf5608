"""The exception tree of bigmodel.

Every failure of the Rust store arrives as one of these classes (the binding maps each
Rust error variant to exactly one of them); operating-system failures arrive as the
built-in ``OSError`` family (``FileNotFoundError``, ``PermissionError``, ...).
`name_list` is how every error message lists names.
"""

from collections.abc import Iterable

# How many names an error message lists before summarising the rest.
NAMES_SHOWN = 5


class StoreError(Exception):
    """Base class of every store failure."""


class TensorNotFoundError(StoreError, KeyError):
    """The store holds no tensor of that name. Also a ``KeyError``, as a Mapping needs."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class CorruptStoreError(StoreError):
    """Bytes on disk disagree with the index; the message names the file and the tensor."""


class IncompleteStoreError(StoreError):
    """A writer did not commit: the directory holds shards or temporary files but no index."""


class StoreFormatError(StoreError):
    """The index or a header is not a store this version can serve."""


def name_list(names: Iterable[str], shown: int = NAMES_SHOWN) -> str:
    """The first ``shown`` names (as a list) and how many were left out: for messages about
    lists that may hold thousands of names."""
    names = list(names)
    hidden = len(names) - shown
    return f"{names[:shown]}" if hidden <= 0 else f"{names[:shown]} and {hidden} more"


__all__ = [
    "StoreError",
    "TensorNotFoundError",
    "CorruptStoreError",
    "IncompleteStoreError",
    "StoreFormatError",
]
