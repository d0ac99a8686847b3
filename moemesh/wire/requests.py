"""Generate requests at the process boundary: proto -> validated engine inputs, shared by router and nodes.

Every field is checked here, so servers answer INVALID_ARGUMENT with a message
naming the field before anything reaches the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moemesh.errors import InvalidRequestError
from moemesh.v1 import inference_pb2

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_LENGTH = 128


@dataclass(frozen=True)
class Sampling:
    """The sampling fields of a request, validated (engine SamplingParams plus stop strings)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_token_ids: tuple[int, ...]
    stop: tuple[str, ...]
    ignore_eos: bool


def sampling_from_proto(msg: inference_pb2.SamplingParams, vocab_size: int) -> Sampling:
    if msg.max_tokens < 1:
        raise InvalidRequestError("sampling.max_tokens must be >= 1")
    if not (math.isfinite(msg.temperature) and msg.temperature >= 0):
        raise InvalidRequestError(f"sampling.temperature must be >= 0 (0 = greedy), got {msg.temperature}")
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidRequestError(f"sampling.top_p must be in (0, 1], got {top_p}")
    if msg.top_k > vocab_size:
        raise InvalidRequestError(f"sampling.top_k must be <= the vocabulary size {vocab_size}, got {msg.top_k}")
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(f"sampling.stop_token_ids has {len(msg.stop_token_ids)} ids; at most "
                                  f"{MAX_STOP_TOKEN_IDS}")
    bad = [t for t in msg.stop_token_ids if t >= vocab_size]
    if bad:
        raise InvalidRequestError(f"sampling.stop_token_ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"sampling.stop has {len(msg.stop)} strings; at most {MAX_STOP_STRINGS}")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in msg.stop):
        raise InvalidRequestError(f"sampling.stop strings must be 1..{MAX_STOP_LENGTH} characters")
    if msg.HasField("seed") and msg.seed >= 2**63:
        raise InvalidRequestError("sampling.seed must be < 2^63")
    return Sampling(
        max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=top_p, top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None, stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop), ignore_eos=msg.ignore_eos,
    )


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable():
        raise InvalidRequestError(f"request_id must be printable and at most {MAX_REQUEST_ID_LENGTH} characters")


class StopStringMatcher:
    """Streams text while watching for stop strings; text that might start one is held back.

    ``push(piece)`` returns the text safe to emit now and whether a stop string ended
    the generation (the stop string itself is not emitted, as in vLLM).
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self._buffer = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        self._buffer += piece
        hits = [(self._buffer.find(s), s) for s in self.stops if s in self._buffer]
        if hits:
            at = min(i for i, _ in hits)
            out, self._buffer = self._buffer[:at], ""
            return out, True
        cut = max(0, len(self._buffer) - self.hold)
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return out
