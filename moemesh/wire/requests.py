"""Generate requests at the process boundary: proto <-> SamplingParams, shared by router, nodes and SDK.

``sampling_from_proto`` checks every field (SamplingParams.check, names prefixed ``sampling.``), so
servers answer INVALID_ARGUMENT with a message naming the field before anything reaches the engine.
"""

from __future__ import annotations

from moemesh.errors import InvalidRequestError
from moemesh.sampling import SamplingParams
from moemesh.text import shorten
from moemesh.v1 import inference_pb2

MAX_REQUEST_ID_LENGTH = 128


def sampling_from_proto(msg: inference_pb2.SamplingParams, vocab_size: int) -> SamplingParams:
    """The request's sampling fields, checked against the model's vocabulary (InvalidRequestError)."""
    params = SamplingParams(
        max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k, seed=msg.seed if msg.HasField("seed") else None, stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop), ignore_eos=msg.ignore_eos, logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )
    return params.check(vocab_size, name=lambda field: f"sampling.{field}")


def sampling_to_proto(params: SamplingParams) -> inference_pb2.SamplingParams:
    return inference_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        seed=params.seed, stop_token_ids=params.stop_token_ids, stop=params.stop, ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
    )


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable():
        raise InvalidRequestError(f"request_id must be printable and at most {MAX_REQUEST_ID_LENGTH} characters, "
                                  f"got {shorten(request_id)!r} ({len(request_id)} characters)")


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
