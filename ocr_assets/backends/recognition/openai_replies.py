"""Reading the VLM server's replies: Retry-After, refusals, degenerate answers, and what the requests cost."""

from __future__ import annotations

import email.utils
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timezone

from ocr_assets import config


def _percentile(ordered: list[float], p: float) -> float:
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 4) if ordered else 0.0


@dataclass
class ServerStats:
    """What the requests to one server of the fleet cost."""

    requests: int = 0
    errors: int = 0  # failed attempts on it (no answer, or one that is retried or refused)
    latencies: list[float] = field(default_factory=list)
    peak_in_flight: int = 0
    taken_out: int = 0  # times it stopped answering and was taken out of service


@dataclass
class VlmStats:
    """What the requests cost: the recognition asset's metadata."""

    requests: int = 0
    retries: int = 0
    errors: Counter = field(default_factory=Counter)  # by kind: http_503, timeout, length, ...
    tokens_in: int = 0
    tokens_out: int = 0
    latencies: list[float] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    started: float = 0.0
    finished: float = 0.0
    servers: list[ServerStats] = field(default_factory=list)  # one per configured server, in order

    def metadata(self) -> dict[str, float | int]:
        lat = sorted(self.latencies)
        wall = max(self.finished - self.started, 1e-9)
        out: dict[str, float | int] = {
            "requests": self.requests, "retries": self.retries, "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out, "latency_p50_seconds": _percentile(lat, 0.5),
            "latency_p95_seconds": _percentile(lat, 0.95),
            "latency_max_seconds": round(lat[-1], 4) if lat else 0.0,
            "requests_per_second": round(self.requests / wall, 2) if self.requests else 0.0,
            "peak_in_flight": self.peak_in_flight,
        }
        out.update({f"errors_{kind}": n for kind, n in sorted(self.errors.items())})
        out["servers"] = len(self.servers)
        for i, server in enumerate(self.servers):
            lat = sorted(server.latencies)
            out.update({f"server_{i}_requests": server.requests, f"server_{i}_errors": server.errors,
                        f"server_{i}_latency_p50_seconds": _percentile(lat, 0.5),
                        f"server_{i}_latency_p95_seconds": _percentile(lat, 0.95),
                        f"server_{i}_peak_in_flight": server.peak_in_flight,
                        f"server_{i}_taken_out": server.taken_out})
        return out


def token_confidence(logprobs) -> float | None:
    """A region's confidence from a choice's ``logprobs`` (``{"content": [{"token", "logprob"}, ...]}``):
    exp of the mean token log-probability, i.e. the geometric mean of the tokens' probabilities.

    Length-normalised (a long answer is not less certain for being long), and every token counts:
    one token at probability 0.01 among twenty otherwise certain ones gives 0.79, where a plain mean of
    probabilities gives 0.95 and the minimum 0.01, whatever the length. None when the server sent
    no log-probabilities (null, absent, malformed): no confidence, never an error.
    """
    try:
        tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
        values = [float(t["logprob"]) for t in tokens or () if isinstance(t, dict)
                  and isinstance(t.get("logprob"), (int, float)) and not isinstance(t.get("logprob"), bool)]
    except (TypeError, ValueError):
        return None
    values = [min(0.0, v) for v in values if not math.isnan(v)]  # a log-probability is never above 0
    if not values:
        return None
    return math.exp(max(sum(values) / len(values), -700.0))  # -inf (vLLM's -9999 too): 0, not an error


def repetition_loop(text: str, min_chars: int = 400, max_period: int = 200, repeats: int = 8) -> bool:
    """Whether ``text`` ends in one short chunk repeated over and over (a decoding loop)."""
    if len(text) < min_chars:
        return False
    tail = text[-max_period * repeats:]
    for period in range(1, max_period + 1):
        if period * repeats > len(tail):
            break
        unit = tail[-period:]
        if tail.endswith(unit * repeats) and unit.strip():
            return True
    return False


def retry_after_seconds(headers) -> float | None:
    """Seconds a Retry-After header asks for (delta seconds or an HTTP date; a past date is 0);
    None when it is absent or malformed, so that the normal backoff applies."""
    try:
        value = str(headers.get("retry-after") or "").strip() if headers is not None else ""
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)  # raises on anything but an HTTP date
            when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
            return max(0.0, when.timestamp() - time.time())
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    except Exception:  # a malformed header must never fail a region
        return None


def http_reason(status: int, content: bytes) -> str:
    """What a non-200 answer means, with the setting to change where there is one."""
    hint = {
        401: f"the server refused the key: set {config.ENV_VLM_API_KEY}",
        403: f"the server refused the key: set {config.ENV_VLM_API_KEY}",
        404: f"check {config.ENV_VLM_BASE_URL} (ending in /v1) and {config.ENV_VLM_MODEL}",
        413: "the request is larger than the server accepts: raise its body limit",
    }.get(status)
    message = content[:300].decode(errors="replace")
    return f"HTTP {status} from the VLM server: {message}" + (f" ({hint})" if hint else "")
