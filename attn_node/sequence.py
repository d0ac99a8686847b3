"""A request as the engine sees it: its (already checked) SamplingParams and the sequence's growing state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from moemesh.sampling import SamplingParams


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
    num_cached: int = 0  # tokens whose latent KV is already in the cache (starts at the shared prefix's end)
    prompt_hashes: list[int] | None = None  # chain keys of the prompt's full blocks (BlockManager, computed once)
    num_committed_blocks: int = 0  # leading prompt blocks already offered to the prefix cache
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
