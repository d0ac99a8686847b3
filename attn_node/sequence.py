"""A request as the engine sees it: sampling parameters and the sequence's growing state."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

from moemesh.errors import InvalidRequestError


GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """What vLLM users expect: temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self, vocab_size: int) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"stop_token_ids {bad} are outside the vocabulary (size {vocab_size})")

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and sampling is argmax anyway.
        return self.temperature < GREEDY_BELOW


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # order of arrival, for first-come-first-served
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose latent KV is already in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        """Tokens the cache must be able to hold for this request at most."""
        # The last sampled token is never fed back, so it needs no cache slot.
        return len(self.prompt_ids) + self.params.max_tokens - 1

    def token_ids(self, start: int, end: int) -> list[int]:
        n_prompt = len(self.prompt_ids)
        if end <= n_prompt:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]
