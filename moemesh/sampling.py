"""SamplingParams: how one request samples, the one type from the client to the sampler.

It is checked once where it enters a process (:meth:`SamplingParams.check`, called by the wire's
``sampling_from_proto``, the CLI and the client SDK) and trusted inside: the engine, scheduler and
sampler take it as is. What only the engine knows (prompt length against context and cache) the
engine checks itself.

Field meanings follow vLLM: temperature 0 is greedy; top_k 0 and top_p 1 switch those filters
off; ``stop`` strings end the generation where they appear in the text (not emitted), and
``stop_token_ids`` where one is sampled. ``logprobs`` (None: off; k: 0..MAX_LOGPROBS) asks for each
generated token's logprob and the k most likely tokens' at its step, as vLLM's ``SamplingParams.logprobs``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from moemesh.errors import InvalidRequestError

GREEDY_BELOW = 1e-5
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64
UINT32 = 1 << 32  # the wire's counts and ids are uint32
MAX_SEED = 1 << 63  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and sampling is argmax anyway.
        return self.temperature < GREEDY_BELOW

    def check(self, vocab_size: int | None = None, name: Callable[[str], str] = str) -> SamplingParams:
        """``self`` when every field is in range; else InvalidRequestError naming the field as ``name(field)``.

        ``name`` puts the field in the caller's words (``--max-tokens`` for the CLI, ``sampling.max_tokens``
        on the wire). Without ``vocab_size`` (the SDK does not know the model) the vocabulary checks wait
        for the server.
        """

        def fail(field: str, what: str):
            raise InvalidRequestError(f"{name(field)} {what}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.max_tokens >= UINT32:
            fail("max_tokens", f"must be < 2**32, got {self.max_tokens}")
        if not _is_real(self.temperature) or not (math.isfinite(self.temperature) and self.temperature >= 0):
            fail("temperature", f"must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k < UINT32:
            fail("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if vocab_size is not None and self.top_k > vocab_size:
            fail("top_k", f"must be <= the vocabulary size {vocab_size}, got {self.top_k}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            fail("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            fail("stop_token_ids", f"has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}")
        bad = [t for t in self.stop_token_ids if not _is_int(t) or not 0 <= t < (vocab_size or UINT32)]
        if bad:
            where = f"the vocabulary (size {vocab_size})" if vocab_size is not None else "[0, 2**32)"
            fail("stop_token_ids", f"{bad[:5]} are outside {where}")
        if len(self.stop) > MAX_STOP_STRINGS:
            fail("stop", f"has {len(self.stop)} strings; at most {MAX_STOP_STRINGS}")
        if any(not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_LENGTH for s in self.stop):
            fail("stop", f"strings must be 1..{MAX_STOP_LENGTH} characters")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] (or unset), got {self.logprobs!r}")
        return self


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def flag_name(field: str) -> str:
    """``max_tokens`` -> ``--max-tokens``: the CLI's name for a field in error messages."""
    return "--" + field.replace("_", "-")
