"""ModelRunner: turns a scheduled step into model inputs over the paged latent cache and runs it.

It owns the cache tensors (one [slots, C + R] tensor per layer) and builds,
once per step, the flat token batch and the attention groups every layer
shares: decoding sequences (one query each) attend over the latent directly
(weight-absorbed MLA); prompt chunks expand K/V first (naive MLA), which costs
fewer FLOPs for long chunks. ``mla_impl`` forces one path for both, for tests
and comparison.

Everything lives on the model's device: the caches, and the step's inputs. Those
are gathered on the host as Python ints (the scheduler's sequences are there)
and uploaded in one copy per step (pinned, asynchronous on a GPU); what follows
from them by arithmetic (context slots, the causal mask) is computed on the
device, which is cheaper than uploading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


class HostInputs:
    """A step's integer inputs, gathered as Python ints on the host and uploaded to the device in one copy."""

    def __init__(self) -> None:
        self._values: list[int] = []
        self._shapes: list[tuple[int, ...]] = []

    def add(self, values: list[int], shape: tuple[int, ...]) -> int:
        """Queue ``values`` (row-major, ``shape``); returns the index of its tensor in :meth:`upload`'s list."""
        if len(values) != math.prod(shape):
            raise ValueError(f"{len(values)} values for shape {shape}")
        self._values.extend(values)
        self._shapes.append(shape)
        return len(self._shapes) - 1

    def upload(self, device: torch.device) -> list[torch.Tensor]:
        """One int64 tensor per :meth:`add`, on ``device``, views of a single host-to-device copy."""
        # Pinned memory lets the copy overlap on a real GPU (a fake CUDA device has no memory to pin).
        pin = device.type == "cuda" and torch.cuda.is_available()
        flat = torch.tensor(self._values, dtype=torch.int64, pin_memory=pin).to(device, non_blocking=pin)
        sizes = [math.prod(shape) for shape in self._shapes]
        return [part.view(shape) for part, shape in zip(flat.split(sizes), self._shapes)]


@dataclass(frozen=True)
class _GroupPlan:
    """An attention group before upload: indices into HostInputs and the sizes the device part needs."""

    token_index: int  # [B, Q]
    q_pos: int  # [B, Q] position of each query (padding -> 0)
    tables: int  # [B, n_blocks]
    context_lens: int  # [B]
    context: int  # S, the longest context in the group
    absorbed: bool


@dataclass(frozen=True)
class _PartPlan:
    """One micro-batch before upload (indices into HostInputs)."""

    ids: int  # [T]
    positions: int  # [T]
    slot_mapping: int  # [T]
    out_rows: int  # [T]
    sample_rows: int  # [n_sampling]
    groups: list[_GroupPlan]


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cfg: ModelConfig,
        blocks: BlockManager,
        dtype: torch.dtype,
        mla_impl: str = "auto",
    ):
        if mla_impl not in MLA_IMPLS:
            raise ValueError(f"mla_impl must be one of {MLA_IMPLS}, got {mla_impl!r}")
        self.model, self.cfg, self.blocks, self.mla_impl = model, cfg, blocks, mla_impl
        self.device = model.device
        slots = blocks.num_blocks * blocks.block_size
        # One extra zeroed slot past the blocks: padded context positions read it, so
        # attention never multiplies a zero probability by uninitialised memory (0 * NaN = NaN).
        self.null_slot = slots
        # torch.empty elsewhere: pages are touched only as blocks are used.
        self.kv_caches = [torch.empty(slots + 1, cfg.cache_row_dim, dtype=dtype, device=self.device)
                          for _ in range(cfg.num_hidden_layers)]
        for cache in self.kv_caches:
            cache[self.null_slot].zero_()

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq], all_logits: bool = False, micro_batches: int = 1) -> torch.Tensor:
        """Run one step, split into ``micro_batches`` run in ping-pong (at most one per sequence). Returns fp32
        logits on the model's device: one row per sampling sequence, in order (or, with ``all_logits``, one per
        computed token)."""
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        host = HostInputs()
        plans = [self._plan(part, host) for part in split_micro_batches(scheduled, micro_batches)]
        inputs = host.upload(self.device)  # the step's one upload
        parts = [self._build(plan, inputs) for plan in plans]
        hiddens = self.model.forward_micro_batches([(ids, batch) for ids, batch, _ in parts], self.kv_caches)
        rows = [h if all_logits else h[sample_rows] for h, (_, _, sample_rows) in zip(hiddens, parts)]
        return self.model.logits(rows[0] if len(rows) == 1 else torch.cat(rows))  # [rows, vocab]

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, AttnBatch, torch.Tensor]:
        """One micro-batch's model inputs on the device: (ids [T], the batch, sample rows [n_sampling])."""
        host = HostInputs()
        plan = self._plan(scheduled, host)
        return self._build(plan, host.upload(self.device))

    def _plan(self, scheduled: list[ScheduledSeq], host: HostInputs) -> _PartPlan:
        """Gather a micro-batch's inputs on the host (Python ints, no tensors yet)."""
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
        T = len(ids)
        out_rows = [0] * T
        groups, offset = [], 0
        for entries, default_absorbed in ((decode, True), (chunks, False)):
            if entries:
                absorbed = default_absorbed if self.mla_impl == "auto" else self.mla_impl == "absorbed"
                groups.append(self._plan_group(entries, absorbed, host, out_rows, offset))
                offset += len(entries) * max(item.num_tokens for _, item in entries)
        return _PartPlan(host.add(ids, (T,)), host.add(positions, (T,)), host.add(slots, (T,)),
                         host.add(out_rows, (T,)), host.add(sample_rows, (len(sample_rows),)), groups)

    def _plan_group(self, entries: list[tuple[int, ScheduledSeq]], absorbed: bool, host: HostInputs,
                    out_rows: list[int], offset: int) -> _GroupPlan:
        """A group's padded [B, Q] queries and [B, n_blocks] tables; fills its tokens' ``out_rows``."""
        B = len(entries)
        Q = max(item.num_tokens for _, item in entries)
        S = max(item.seq.num_cached + item.num_tokens for _, item in entries)
        bs = self.blocks.block_size
        n_blocks = -(-S // bs)
        token_index, q_pos, tables, ctx_len = [0] * (B * Q), [0] * (B * Q), [0] * (B * n_blocks), [0] * B
        for b, (row, item) in enumerate(entries):
            n, start = item.num_tokens, item.seq.num_cached
            for q in range(n):
                token_index[b * Q + q] = row + q
                q_pos[b * Q + q] = start + q
                out_rows[row + q] = offset + b * Q + q
            ctx_len[b] = start + n
            table = item.seq.block_table[: -(-(start + n) // bs)]
            tables[b * n_blocks : b * n_blocks + len(table)] = table
        return _GroupPlan(host.add(token_index, (B, Q)), host.add(q_pos, (B, Q)), host.add(tables, (B, n_blocks)),
                          host.add(ctx_len, (B,)), S, absorbed)

    def _build(self, plan: _PartPlan, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, AttnBatch, torch.Tensor]:
        batch = AttnBatch(positions=inputs[plan.positions], slot_mapping=inputs[plan.slot_mapping],
                          groups=tuple(self._group(g, inputs) for g in plan.groups), out_rows=inputs[plan.out_rows])
        return inputs[plan.ids], batch, inputs[plan.sample_rows]

    def _group(self, g: _GroupPlan, inputs: list[torch.Tensor]) -> AttnGroup:
        """The group's device tensors; context slots and the mask follow from the uploaded ones, on the device."""
        bs = self.blocks.block_size
        tables, ctx_len, q_pos = inputs[g.tables], inputs[g.context_lens], inputs[g.q_pos]  # [B, nb], [B], [B, Q]
        key_pos = torch.arange(g.context, device=self.device)  # [S]
        ctx_slots = tables[:, key_pos // bs] * bs + key_pos % bs  # [B, S]
        ctx_slots = ctx_slots.masked_fill(key_pos[None, :] >= ctx_len[:, None], self.null_slot)
        # Causal within the sequence; a padded query (position 0) sees key 0 only and is discarded.
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)  # [B, 1, Q, S]
        return AttnGroup(inputs[g.token_index], ctx_slots, mask, g.absorbed, tables, ctx_len, bs)
