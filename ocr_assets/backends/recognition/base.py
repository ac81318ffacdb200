"""The interface every recognition backend implements."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
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
    """What a recognizer read from one crop; ``status`` is ok or error.

    ``cacheable`` is True only for a final answer: a text that was read, or a verdict that the
    same request would get again (an answer cut at max_tokens, a repetition loop). Failures of
    the channel (a 4xx, a timeout, a dropped connection, a batch that crashed) are never cached:
    a rotated key or a restarted server must not poison later runs.

    ``confidence`` is the recognizer's own certainty in the text, in [0, 1] (the local models'
    line scores, a VLM's token probabilities); None when no text was read or the recognizer
    gives no certainty.
    """

    text: str
    status: str = "ok"
    error: str | None = None
    cacheable: bool = False
    confidence: float | None = None


def text_weight(text: str | None) -> int:
    """The characters a confidence is weighted by: the text's non-whitespace characters."""
    return sum(not c.isspace() for c in text or "")


def weighted_confidence(parts: Iterable[tuple[float | None, int]]) -> float | None:
    """The mean of (confidence, weight) pairs weighted by their weights, ignoring parts with no
    confidence or no weight; None when nothing is left."""
    total = weight = 0.0
    for confidence, w in parts:
        if confidence is not None and w > 0:
            total += float(confidence) * w
            weight += w
    return min(1.0, max(0.0, total / weight)) if weight else None


class Recognizer(Protocol):
    """Reads the text of crops."""

    name: str
    batch_size: int
    version: str  # the recognizer's code and models: a new version reads every crop again

    def recognize(self, crops: Sequence[Crop]) -> list[Recognized]:
        """One result per crop, in order; a crop that fails alone gets status "error".

        Raises when the batch as a whole failed (``recognize_in_batches`` then reads it in halves).
        """
        ...

    def recognize_stream(self, items: Iterable[tuple[int, Crop]]) -> Iterator[tuple[int, Recognized]]:
        """(key, result) for each (key, crop), in any order, pulling crops only as it needs them.

        The recognition stage hands crops over through this, so a recognizer that keeps many
        requests in flight takes the next crop as soon as one finishes, and a shard's crops
        never have to sit in memory at once.
        """
        ...

    def cache_key(self, crop: Crop) -> str:
        """A key that is equal for two crops exactly when this recognizer would read them the same way:
        the crop's bytes and task, ``version``, and every setting that changes the reading."""
        ...

    def run_metadata(self) -> dict[str, int | float]:
        """What the last ``recognize_stream`` cost (requests, retries, latency...), for the stage's metadata."""
        ...


def recognize_in_batches(
    recognizer: Recognizer, items: Iterable[tuple[int, Crop]]
) -> Iterator[tuple[int, Recognized]]:
    """``recognize_stream`` for recognizers that work in batches: ``batch_size`` crops per call.

    A batch that fails as a whole (an exception, or a wrong number of results) is read again in
    halves, down to each crop alone: only a crop that fails alone gets the error, and that error
    is never cached (another run may read it).
    """
    step = max(1, int(recognizer.batch_size or 1))
    batch: list[tuple[int, Crop]] = []

    def read(crops: list[Crop]) -> list[Recognized]:
        try:
            results = list(recognizer.recognize(crops))
            if len(results) != len(crops):
                raise RuntimeError(f"it returned {len(results)} results for {len(crops)} crops")
            return results
        except Exception as exc:
            if len(crops) == 1:
                return [Recognized("", "error", f"recognizer {recognizer.name!r} failed on its batch, and on this "
                                                f"crop alone: {type(exc).__name__}: {exc}")]
        half = (len(crops) + 1) // 2
        return read(crops[:half]) + read(crops[half:])

    def flush() -> Iterator[tuple[int, Recognized]]:
        yield from zip((key for key, _ in batch), read([crop for _, crop in batch]))

    for item in items:
        batch.append(item)
        if len(batch) == step:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def content_key(image: bytes, *settings: str) -> str:
    """sha256 over a crop's bytes and everything else that decides its answer."""
    digest = hashlib.sha256(image)
    for value in settings:
        digest.update(b"\x00" + value.encode())
    return digest.hexdigest()
