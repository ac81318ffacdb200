"""The interface every recognition backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Crop:
    """One region's image as stored in the ``crops`` asset."""

    task: str  # text, table or formula (skip crops are never sent)
    image: bytes  # encoded PNG or JPEG
    width: int
    height: int


@dataclass(frozen=True)
class Recognized:
    """What a recognizer read from one crop; ``status`` is ok or error."""

    text: str
    status: str = "ok"
    error: str | None = None


class Recognizer(Protocol):
    """Reads the text of crops."""

    name: str
    batch_size: int

    def recognize(self, crops: Sequence[Crop]) -> list[Recognized]:
        """One result per crop, in order; a crop that fails gets status "error", never an exception."""
        ...
