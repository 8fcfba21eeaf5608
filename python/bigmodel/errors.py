"""The exception tree of bigmodel.

Every failure of the Rust store arrives as one of these classes (the binding maps each
Rust error variant to exactly one of them); operating-system failures arrive as the
built-in ``OSError`` family (``FileNotFoundError``, ``PermissionError``, ...).
"""


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


__all__ = [
    "StoreError",
    "TensorNotFoundError",
    "CorruptStoreError",
    "IncompleteStoreError",
    "StoreFormatError",
]
