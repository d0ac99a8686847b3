"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step, running sequences that are decoding get one token each first (so a
long prompt never stalls them); what is left of the token budget goes to
prompt chunks, oldest request first, admitting waiting requests while the
sequence limit and the KV cache allow. Long prompts are prefilled in chunks
across steps (chunked prefill) while others decode.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in the running batch at most
    max_num_batched_tokens: int = 512  # tokens computed in one step at most (prefill chunk budget)


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens of this sequence computed this step, starting at seq.num_cached

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_cached + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        decoding = [s for s in self.running if s.num_cached >= len(s.prompt_ids)]
        prefilling = [s for s in self.running if s.num_cached < len(s.prompt_ids)]
        for seq in decoding:
            if budget == 0:
                break
            out.append(ScheduledSeq(seq, 1))
            budget -= 1
        for seq in prefilling:
            if budget == 0:
                break
            n = min(seq.num_tokens - seq.num_cached, budget)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_reserve(seq.max_total_tokens):
                break  # first come, first served: later requests do not jump the queue
            self.waiting.popleft()
            self.blocks.reserve(seq, seq.max_total_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_cached, budget)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
