"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step, running sequences that are decoding get one token each first (so a
long prompt never stalls them); what is left of the token budget goes to
prompt chunks, oldest request first, admitting waiting requests while the
sequence limit and the KV cache allow. Long prompts are prefilled in chunks
across steps (chunked prefill) while others decode.

A request admitted with a cached prompt prefix (attn_node/block_manager.py)
starts at that prefix's end: only the rest of its prompt is prefilled.

After a step ran, ``postprocess`` owns what it changed in the sequences: the
cache advanced (the prompt blocks it filled registered for sharing), the sampled tokens appended, and sequences that ended (EOS or a
stop token: "stop"; ``max_tokens``: "length") finished and their blocks freed.
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
    eos_token_ids: tuple[int, ...] = ()  # the model's end-of-sequence tokens (a request may ignore them)


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens of this sequence computed this step, starting at seq.num_cached

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_cached + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SampledToken:
    seq: Sequence
    token: int
    finish_reason: str | None  # "stop" | "length" when this token ended the sequence, else None


def finish_reason(seq: Sequence, token: int, eos_token_ids: tuple[int, ...]) -> str | None:
    """Why ``seq`` ends with ``token`` just appended, or None while it goes on."""
    p = seq.params
    if token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids):
        return "stop"
    if len(seq.output_ids) >= p.max_tokens:
        return "length"
    return None


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
            if not self.blocks.can_admit(seq):
                break  # first come, first served: later requests do not jump the queue
            self.waiting.popleft()
            self.blocks.admit(seq)  # its whole max length; num_cached starts past the prompt's cached prefix
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_cached, budget)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def postprocess(self, scheduled: list[ScheduledSeq], tokens: list[int]) -> list[SampledToken]:
        """Apply a step that ran: ``tokens`` holds one sampled token per sequence whose step reached its end,
        in ``scheduled`` order. Returns them as :class:`SampledToken`, finished sequences already freed."""
        sampling = [item.seq for item in scheduled if item.samples]  # before num_cached moves
        if len(sampling) != len(tokens):
            raise ValueError(f"{len(tokens)} sampled tokens for {len(sampling)} sampling sequences")
        for item in scheduled:
            item.seq.num_cached += item.num_tokens
            self.blocks.commit(item.seq)  # prompt blocks it filled are now shareable
        out = []
        for seq, token in zip(sampling, tokens):
            seq.output_ids.append(token)
            reason = finish_reason(seq, token, self.config.eos_token_ids)
            if reason is not None:
                self.finish(seq, reason)
            out.append(SampledToken(seq, token, reason))
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
