"""ModelRunner: turns a scheduled step into model inputs over the paged latent cache and runs it.

It owns the cache tensors (one [slots, C + R] tensor per layer) and builds,
once per step, the flat token batch and the attention groups every layer
shares: decoding sequences (one query each) attend over the latent directly
(weight-absorbed MLA); prompt chunks expand K/V first (naive MLA), which costs
fewer FLOPs for long chunks. ``mla_impl`` forces one path for both, for tests
and comparison.
"""

from __future__ import annotations

import torch

from moemesh.model.config import ModelConfig

from .block_manager import BlockManager
from .model import AttnBatch, AttnGroup, Transformer
from .scheduler import ScheduledSeq

MLA_IMPLS = ("auto", "naive", "absorbed")


def split_micro_batches(scheduled: list[ScheduledSeq], m: int) -> list[list[ScheduledSeq]]:
    """Cut the step into at most ``m`` contiguous parts of about equal token counts (order kept)."""
    m = max(1, min(m, len(scheduled)))
    total = sum(item.num_tokens for item in scheduled)
    parts: list[list[ScheduledSeq]] = [[]]
    done = 0
    for item in scheduled:
        # Start a new part when this item's midpoint falls past the current part's share.
        if parts[-1] and len(parts) < m and done + item.num_tokens / 2 >= total * len(parts) / m:
            parts.append([])
        parts[-1].append(item)
        done += item.num_tokens
    return parts


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cfg: ModelConfig,
        blocks: BlockManager,
        dtype: torch.dtype,
        mla_impl: str = "auto",
        micro_batches: int = 1,
    ):
        if mla_impl not in MLA_IMPLS:
            raise ValueError(f"mla_impl must be one of {MLA_IMPLS}, got {mla_impl!r}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.model, self.cfg, self.blocks, self.mla_impl = model, cfg, blocks, mla_impl
        self.micro_batches = micro_batches
        slots = blocks.num_blocks * blocks.block_size
        # One extra zeroed slot past the blocks: padded context positions read it, so
        # attention never multiplies a zero probability by uninitialised memory (0 * NaN = NaN).
        self.null_slot = slots
        # torch.empty elsewhere: pages are touched only as blocks are used.
        self.kv_caches = [torch.empty(slots + 1, cfg.kv_cache_dim, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        for cache in self.kv_caches:
            cache[self.null_slot].zero_()

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq], all_logits: bool = False) -> torch.Tensor:
        """Run one step. Returns fp32 logits: one row per sampling sequence, in order
        (or, with ``all_logits``, one per computed token)."""
        parts = [self.prepare(part) for part in split_micro_batches(scheduled, self.micro_batches)]
        hiddens = self.model.forward_micro_batches([(ids, batch) for ids, batch, _ in parts], self.kv_caches)
        rows = [h if all_logits else h[sample_rows] for h, (_, _, sample_rows) in zip(hiddens, parts)]
        return self.model.logits(torch.cat(rows))  # [rows, vocab]

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, AttnBatch, torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        decode, chunks = [], []
        for item in scheduled:
            seq, start = item.seq, item.seq.num_cached
            first_row = len(ids)
            ids.extend(seq.token_ids(start, start + item.num_tokens))
            positions.extend(range(start, start + item.num_tokens))
            slots.extend(self.blocks.slot(seq, p) for p in range(start, start + item.num_tokens))
            if item.samples:
                sample_rows.append(len(ids) - 1)
            entry = (first_row, item)
            (decode if item.num_tokens == 1 else chunks).append(entry)
        groups = []
        for entries, default_absorbed in ((decode, True), (chunks, False)):
            if entries:
                absorbed = default_absorbed if self.mla_impl == "auto" else self.mla_impl == "absorbed"
                groups.append(self._group(entries, absorbed))
        batch = AttnBatch(
            positions=torch.tensor(positions, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            groups=groups,
        )
        return torch.tensor(ids, dtype=torch.int64), batch, torch.tensor(sample_rows, dtype=torch.int64)

    def _group(self, entries: list[tuple[int, ScheduledSeq]], absorbed: bool) -> AttnGroup:
        B = len(entries)
        Q = max(item.num_tokens for _, item in entries)
        S = max(item.seq.num_cached + item.num_tokens for _, item in entries)
        bs = self.blocks.block_size
        n_blocks = -(-S // bs)
        token_index = torch.zeros(B, Q, dtype=torch.int64)
        q_pos = torch.zeros(B, Q, dtype=torch.int64)
        query_valid = torch.zeros(B, Q, dtype=torch.bool)
        tables = torch.zeros(B, n_blocks, dtype=torch.int64)
        ctx_len = torch.zeros(B, 1, dtype=torch.int64)
        for b, (row, item) in enumerate(entries):
            n, start = item.num_tokens, item.seq.num_cached
            token_index[b, :n] = torch.arange(row, row + n)
            q_pos[b, :n] = torch.arange(start, start + n)
            query_valid[b, :n] = True
            ctx_len[b] = start + n
            table = item.seq.block_table[: -(-(start + n) // bs)]
            tables[b, : len(table)] = torch.tensor(table, dtype=torch.int64)
        key_pos = torch.arange(S)  # [S]
        ctx_slots = tables[:, key_pos // bs] * bs + key_pos % bs  # [B, S]
        ctx_slots = ctx_slots.masked_fill(key_pos[None, :] >= ctx_len, self.null_slot)
        # Causal within the sequence; a padded query (position 0) sees key 0 only and is discarded.
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)  # [B, 1, Q, S]
        return AttnGroup(token_index, query_valid, ctx_slots, mask, absorbed, tables, ctx_len.squeeze(1), bs)
