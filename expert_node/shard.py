"""ExpertShard: any subset of DeepSeekMoE routed experts, computed in one grouped pass per layer.

Glossary: T rows, D hidden size, I moe_intermediate_size, K experts per token,
E_l experts this shard hosts in a layer, A = number of (row, expert) assignments
that land on this shard, (bn, bk) the FP8 scale block.

The shard stores each layer's experts stacked, ``w13`` = [E_l, 2I, D] (gate and
up projections fused) and ``w2`` = [E_l, D, I], plus a table from logical
expert id to local slot (on the device, with a CPU mirror for bookkeeping and
host-side validation). Everything lives on the device given at construction.

Two ways to compute a batch:

* an injected fused-MoE op (the Triton kernel on GPUs): one call per layer, no
  host sync; ids must be valid, so they are checked at the boundary (the Dispatch
  service checks its host copy, see ``forward(host_ids=)``) or trusted (the
  model's own gate, ``validate=False``);
* on CPUs, batches whose row count is within the kernel's limit run as one C call, routing
  bookkeeping included (kernels/cpu_gemv.c ``mm_moe_forward``: slots, sort, gather, every busy
  expert with weights streamed once, bf16/fp16 widened in registers under fp32 activations,
  weighting and sum); bigger ones sort the hosted assignments by slot on the torch side and take
  the C kernel where ``kernels.cpu_paths.choose_expert_path`` says so; otherwise (no compiler, big prefill batches)
  ``_pick_strategy`` chooses among the torch strategies, a padded batched matmul, a loop over
  busy experts or grouped GEMMs, which are also the plain-torch references of the kernel.
  These read the routing on the host: they are the CPU path only.

FP8 kept (``fp8_block`` set): DeepSeek-V3's block-quantized experts stay e4m3,
``w13`` [E_l, 2I', D] and ``w2`` [E_l, D, I'] with fp32 ``w13_scale_inv``
[E_l, ceil(2I'/bn), ceil(D/bk)] and ``w2_scale_inv`` [E_l, ceil(D/bn), ceil(I'/bk)],
computed by the CPU FP8 kernel on CPU (kernels/cpu_fp8.py) and the FP8 fused-MoE op elsewhere. Fusing gate
and up keeps the scale blocks aligned
only when I is a multiple of bn, so otherwise I is padded to I' = ceil(I/bn) * bn
with zero weights (exact: silu(0) * 0 = 0, and the zero down columns add nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from moemesh.kernels import cpu_fp8, cpu_kernels
from moemesh.kernels.cpu_paths import AMX_MIN_ROWS, amx_fits, choose_expert_path
from moemesh.model.checkpoint import Fp8Tensor

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, D], up [I, D], down [D, I]
Fp8Weights = tuple[Fp8Tensor, Fp8Tensor, Fp8Tensor]  # the same, block-quantized


@dataclass(frozen=True)
class _LayerExperts:
    expert_ids: list[int]  # logical id of each local slot
    slot_of: torch.Tensor  # [E] int64 on the device: logical expert id -> local slot, -1 when not hosted
    slot_of_host: np.ndarray  # [E] the same on the host: bookkeeping and validation, never a device read
    w13: torch.Tensor  # [E_l, 2I', D] compute dtype, or e4m3 (w13_q) when FP8 is kept
    w2: torch.Tensor  # [E_l, D, I'] likewise
    inter: int  # I of the checkpoint; I' > I only for FP8 layers padded to whole scale blocks
    w13_scale_inv: torch.Tensor | None = None  # [E_l, ceil(2I'/bn), ceil(D/bk)] fp32, FP8 only
    w2_scale_inv: torch.Tensor | None = None  # [E_l, ceil(D/bn), ceil(I'/bk)] fp32, FP8 only

    @cached_property
    def hosted(self) -> np.ndarray:  # once per snapshot: messages ask for it on every call
        return self.slot_of_host >= 0

    _accepts = cached_property(lambda self: np.concatenate([[True], self.hosted]))  # [E + 1]: -1 first, then experts

    @cached_property
    def kernel_tables(self) -> cpu_kernels.ExpertTables:
        """The C layer call's weight and slot arguments, checked once: a snapshot never changes its tensors."""
        return cpu_kernels.expert_tables(self.slot_of, self.w13, self.w2)

    def accepts_ids(self, ids: np.ndarray) -> bool:
        """Every id is -1 or hosted here: one gather (ids + 1 seen unsigned puts ids < -1 past the table's end)."""
        shifted = (ids + 1).view(np.uint32 if ids.dtype.itemsize == 4 else np.uint64)
        return bool(shifted.max(initial=0) < len(self._accepts) and self._accepts[shifted].all())

    def nbytes(self) -> int:
        parts = (self.slot_of, self.w13, self.w2, self.w13_scale_inv, self.w2_scale_inv)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[A, in] x [E_l, in, out] over row segments ending at ``offs`` -> [A, out]."""
    if (x.shape[1] * x.element_size()) % 16 == 0 and (w_t.shape[2] * w_t.element_size()) % 16 == 0:
        return F.grouped_mm(x, w_t, offs=offs)
    # torch's grouped GEMM needs 16-byte aligned rows; odd sizes take one GEMM per expert segment.
    out = x.new_empty(x.shape[0], w_t.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w_t[e]
        start = end
    return out


class ExpertShard:
    """Holds (layer, expert) SwiGLU experts and computes their weighted sum for routed rows."""

    STRATEGIES = ("auto", "kernel", "grouped", "padded", "looped")

    def __init__(self, n_routed_experts: int, dtype: torch.dtype = torch.float32, strategy: str = "auto",
                 fused_moe: Callable | None = None, device: torch.device | str = "cpu", *,
                 fp8_block: tuple[int, int] | None = None, fused_moe_fp8: Callable | None = None,
                 weight_dtype: torch.dtype | None = None):
        if strategy not in self.STRATEGIES:
            raise ValueError(f"strategy must be one of {self.STRATEGIES}, got {strategy!r}")
        self.n_routed_experts = n_routed_experts
        self.fused_moe = fused_moe  # the Triton fused-MoE op (GPUs); None = the CPU strategies below
        self.dtype = dtype  # the compute dtype (activations, accumulation)
        # the weights' dtype in memory unless FP8 is kept: ``dtype`` by default; bf16/fp16 under fp32 compute
        # on CPU (the kernel widens them in registers, the torch strategies per expert)
        self.weight_dtype = weight_dtype or dtype
        self.device = torch.device(device)  # where the weights live and the math runs
        self.strategy = strategy  # auto picks per batch; the others force a path (tests, benchmarks)
        # FP8 kept: experts stay e4m3 with (bn, bk) block scales and run through the FP8 fused-MoE op.
        self.fp8_block = None if fp8_block is None else (int(fp8_block[0]), int(fp8_block[1]))
        if self.fp8_block is not None and fused_moe_fp8 is None:
            from moemesh.kernels.fused_moe import select_fused_moe

            fused_moe_fp8 = select_fused_moe(self.device, fp8=True)  # Triton on CUDA, the reference elsewhere
        self.fused_moe_fp8 = fused_moe_fp8
        self._layers: dict[int, _LayerExperts] = {}
        # strict: a routed expert this shard lacks is an error, not a zero contribution (the Dispatch service
        # validates first; this re-checks against the snapshot used, in case a drop ran in between)
        self.strict = False

    # ---- what is hosted -------------------------------------------------
    def hosted(self) -> dict[int, list[int]]:
        """layer id -> sorted logical expert ids held."""
        return {layer: sorted(le.expert_ids) for layer, le in self._layers.items()}

    def snapshot(self, layer_id: int) -> _LayerExperts | None:
        """The layer's experts now (None: none here); check ids against it, then ``forward(snapshot=)`` with it."""
        return self._layers.get(layer_id)

    def hosted_mask(self, layer_id: int) -> np.ndarray | None:
        """[E] bool, True for experts of ``layer_id`` held here; None when the layer has none."""
        le = self._layers.get(layer_id)
        return None if le is None else le.hosted

    def hosts(self, layer_id: int, expert_id: int) -> bool:
        le = self._layers.get(layer_id)
        return le is not None and 0 <= expert_id < self.n_routed_experts and bool(le.slot_of_host[expert_id] >= 0)

    def nbytes(self) -> int:
        """Bytes the hosted experts take on the device (weights, FP8 scales, slot tables)."""
        return sum(le.nbytes() for le in self._layers.values())

    # ---- loading and dropping -------------------------------------------
    def add_experts(self, layer_id: int, weights: dict[int, Weights] | dict[int, Fp8Weights]) -> None:
        """Add experts to a layer. ``weights``: expert id -> (gate [I, D], up [I, D], down [D, I]).

        Plain tensors on a dequantized shard, :class:`Fp8Tensor` triples on an FP8-kept one
        (``fp8_block`` set); any device, they are copied to the shard's.
        """
        if not weights:
            return
        for e, triple in weights.items():
            if not 0 <= e < self.n_routed_experts:
                raise ValueError(f"expert id {e} is outside 0..{self.n_routed_experts - 1}")
            self._check_kind(e, triple)
        kept = self._export(layer_id)
        kept.update(weights)
        self._rebuild(layer_id, kept)

    def drop_experts(self, layer_id: int, expert_ids: list[int]) -> None:
        kept = self._export(layer_id)
        for e in expert_ids:
            kept.pop(e, None)
        if kept:
            self._rebuild(layer_id, kept)
        else:
            self._layers.pop(layer_id, None)

    def _check_kind(self, expert_id: int, triple: tuple) -> None:
        fp8 = [isinstance(w, Fp8Tensor) for w in triple]
        if len(triple) != 3 or (any(fp8) and not all(fp8)):
            raise ValueError(f"expert {expert_id}: weights must be (gate, up, down), all tensors or all Fp8Tensor")
        if self.fp8_block is None and fp8[0]:
            raise ValueError(f"expert {expert_id}: FP8 weights given to a shard that dequantizes (fp8_block=None); "
                             "dequantize them or build the shard with fp8_block")
        if self.fp8_block is not None:
            if not fp8[0]:
                raise ValueError(f"expert {expert_id}: this shard keeps FP8 ({self.fp8_block} blocks) and needs "
                                 "Fp8Tensor weights (Checkpoint.load(..., keep_fp8=True)), got plain tensors")
            if any(w.block != self.fp8_block for w in triple):
                raise ValueError(f"expert {expert_id}: weights in {triple[0].block} blocks, but this shard "
                                 f"keeps {self.fp8_block} blocks")

    def _export(self, layer_id: int) -> dict[int, Weights] | dict[int, Fp8Weights]:
        """The hosted experts of a layer as add_experts takes them (FP8 stays e4m3, padding removed); views of
        the device tensors. ``unbind``/``narrow``, not ``[...]``: the same views, and ones fake CUDA tensors take
        on a CPU-only torch build (its Python indexing asks for a CUDA device guard)."""
        le = self._layers.get(layer_id)
        if le is None:
            return {}
        inter, ids = le.inter, le.expert_ids
        if le.w13_scale_inv is None:
            return {e: (w13.narrow(0, 0, inter), w13.narrow(0, inter, inter), w2)
                    for e, w13, w2 in zip(ids, le.w13.unbind(0), le.w2.unbind(0))}
        bn, bk = self.fp8_block
        padded = le.w2.shape[-1]  # I'
        rows, cols = math.ceil(inter / bn), math.ceil(inter / bk)  # the unpadded scale grids
        grid = padded // bn  # gate's scale rows in the padded layout (I' is a multiple of bn)
        out = {}
        for e, w13, s13, w2, s2 in zip(ids, le.w13.unbind(0), le.w13_scale_inv.unbind(0), le.w2.unbind(0),
                                       le.w2_scale_inv.unbind(0)):
            gate = Fp8Tensor(w13.narrow(0, 0, inter), s13.narrow(0, 0, rows), self.fp8_block)
            up = Fp8Tensor(w13.narrow(0, padded, inter), s13.narrow(0, grid, rows), self.fp8_block)
            down = Fp8Tensor(w2.narrow(1, 0, inter), s2.narrow(1, 0, cols), self.fp8_block)
            out[e] = (gate, up, down)
        return out

    def _rebuild(self, layer_id: int, weights: dict[int, tuple]) -> None:
        # A new _LayerExperts replaces the old in one assignment: forward() reads a layer's snapshot once, so
        # loads and drops may run on another thread than the math (never two of them at once, though).
        expert_ids = sorted(weights)
        slot_of_host = np.full(self.n_routed_experts, -1, dtype=np.int64)
        slot_of_host[expert_ids] = np.arange(len(expert_ids))
        slot_of = torch.tensor(slot_of_host.tolist(), device=self.device)  # one upload per rebuild, never per batch
        if self.fp8_block is None:
            dev = [tuple(w.to(self.device, self.weight_dtype) for w in weights[e]) for e in expert_ids]
            w13 = torch.stack([torch.cat([gate, up], dim=0) for gate, up, _ in dev]).contiguous()
            w2 = torch.stack([down for _, _, down in dev]).contiguous()
            self._layers[layer_id] = _LayerExperts(expert_ids, slot_of, slot_of_host, w13, w2, w2.shape[-1])
            return
        self._layers[layer_id] = self._build_fp8(expert_ids, slot_of, slot_of_host, weights)

    def _build_fp8(self, expert_ids, slot_of, slot_of_host, weights) -> _LayerExperts:
        bn, _ = self.fp8_block
        inter = weights[expert_ids[0]][0].shape[0]
        padded = math.ceil(inter / bn) * bn  # I': gate and up fill whole scale-row blocks, so [gate; up] aligns
        w13_q, w13_s, w2_q, w2_s = [], [], [], []
        for e in expert_ids:
            gate, up, down = (self._to_device(w) for w in weights[e])
            if gate.shape[0] != inter or up.shape != gate.shape or down.shape != (gate.shape[1], inter):
                raise ValueError(f"expert {e}: gate {list(gate.shape)}, up {list(up.shape)}, down "
                                 f"{list(down.shape)} do not match [I, D], [I, D], [D, I] with I = {inter}")
            gate, up, down = _pad_fp8(gate, padded, None), _pad_fp8(up, padded, None), _pad_fp8(down, None, padded)
            w13_q.append(torch.cat([gate.q, up.q]))
            w13_s.append(torch.cat([gate.scale_inv, up.scale_inv]))
            w2_q.append(down.q)
            w2_s.append(down.scale_inv)
        return _LayerExperts(
            expert_ids, slot_of, slot_of_host,
            w13=torch.stack(w13_q).contiguous(), w2=torch.stack(w2_q).contiguous(), inter=inter,
            w13_scale_inv=torch.stack(w13_s).contiguous(), w2_scale_inv=torch.stack(w2_s).contiguous(),
        )  # fmt: skip

    def _to_device(self, w: Fp8Tensor) -> Fp8Tensor:
        return Fp8Tensor(w.q.to(self.device), w.scale_inv.to(self.device, torch.float32), w.block)

    # ---- validation -----------------------------------------------------
    def _validate(self, layer_id: int, le: _LayerExperts | None, ids: np.ndarray) -> None:
        """Expert ids in range and, when strict, hosted in the snapshot used; reads only host data."""
        if ids.size and (ids.min() < -1 or ids.max() >= self.n_routed_experts):
            raise ValueError(f"routed expert ids must be in 0..{self.n_routed_experts - 1} (or -1 = skip)")
        if not self.strict:
            return
        routed = ids[ids >= 0]
        if le is None:
            if routed.size:
                raise ValueError(f"layer {layer_id} has no experts here (dropped meanwhile?)")
            return
        missing = np.unique(routed[~le.hosted[routed]])
        if missing.size:
            raise ValueError(f"layer {layer_id}: experts {missing[:8].tolist()} are not hosted here "
                             "(dropped meanwhile?)")

    # ---- math -----------------------------------------------------------
    def forward(
        self,
        layer_id: int,
        x: torch.Tensor,  # [T, D]
        topk_idx: torch.Tensor,  # [T, K] logical expert ids, -1 = skip
        topk_weights: torch.Tensor,  # [T, K]
        *,
        validate: bool = True,
        host_ids: np.ndarray | None = None,  # [T, K] a host copy of topk_idx, for validation
        snapshot: _LayerExperts | None = None,  # the layer's snapshot the caller checked host_ids against
    ) -> torch.Tensor:
        """Per row, sum_k w_k * SwiGLU_k(x) over the row's experts that this shard hosts; [T, D].

        Rows whose experts all live elsewhere come back as zeros, so partial results
        from several shards simply add up.

        ``validate`` checks the ids first (and, when ``strict``, that they are hosted in the
        snapshot used). It reads ``host_ids`` when given, else copies ``topk_idx`` to the
        host: a device sync on GPUs, so GPU callers pass ``host_ids`` (the Dispatch
        service has them) or ``validate=False`` (ids from the model's own gate).
        """
        le = self._layers.get(layer_id) if snapshot is None else snapshot  # one snapshot for the whole call
        if validate and (snapshot is None or host_ids is None):
            ids = host_ids if host_ids is not None else topk_idx.detach().cpu().numpy()
            self._validate(layer_id, le, np.asarray(ids))
        if le is None or x.shape[0] == 0 or topk_idx.shape[1] == 0:
            return torch.zeros_like(x)  # [T, D]
        if host_ids is not None and not (np.asarray(host_ids) >= 0).any():
            return torch.zeros_like(x)  # every assignment is computed elsewhere: no math (the host copy says so)
        if le.w13_scale_inv is not None:
            # the CPU FP8 kernel (kernels/cpu_fp8.py): one C call, one byte read per weight; rows in any dtype (a GPU
            # attention node sends bf16) computed in fp32; else the FP8 op (Triton on CUDA, the reference elsewhere)
            if self._layer_kernel_ok(le, x):
                return cpu_fp8.moe_forward(x.float().contiguous(), topk_idx.long().contiguous(),
                                           topk_weights.float().contiguous(), le.slot_of, le.w13, le.w13_scale_inv,
                                           le.w2, le.w2_scale_inv, self.fp8_block).to(x.dtype)
            return self.fused_moe_fp8(
                x.to(self.dtype), le.w13, le.w13_scale_inv, le.w2, le.w2_scale_inv,
                _local_slots(le, topk_idx), topk_weights.float(), self.fp8_block, check_ids=False,
            ).to(x.dtype)  # fmt: skip
        if self.fused_moe is not None:
            local = _local_slots(le, topk_idx)  # [T, K]
            return self.fused_moe(x.to(self.dtype), le.w13, le.w2, local, topk_weights.float(),
                                  check_ids=False).to(x.dtype)
        return self._forward_cpu(le, x, topk_idx, topk_weights)

    def _forward_cpu(self, le: _LayerExperts, x, topk_idx, topk_weights) -> torch.Tensor:
        """The CPU strategies: hosted assignments sorted by slot, computed per expert segment (host reads)."""
        if x.dtype != torch.float32 and self.dtype == torch.float32:
            # half rows (a GPU attention node's) widen exactly to the fp32 this shard computes in: the layer is then
            # the fp32 rows' (the whole-layer call included), summed over experts in fp32 and rounded once
            return self._forward_cpu(le, x.float(), topk_idx, topk_weights).to(x.dtype)
        layer_ok = self._layer_kernel_ok(le, x)
        amx_ok = layer_ok and self._amx_ok(le)
        if layer_ok and self._whole_layer_kernel(le, x, amx_ok):
            return cpu_kernels.moe_forward_tables(_contiguous(x), _contiguous(topk_idx, torch.int64),
                                                  _contiguous(topk_weights, torch.float32), le.kernel_tables,
                                                  amx_min_rows=AMX_MIN_ROWS if amx_ok else 0)
        out = torch.zeros_like(x)  # [T, D]
        top_k = topk_idx.shape[1]
        # -1 marks an assignment another node computes (a replica took it): skip it like a foreign expert.
        slots = _local_slots(le, topk_idx).reshape(-1)  # [T*K], -1 where not ours
        hosted = (slots >= 0).nonzero().squeeze(1)  # [A] flat (row, k) positions we compute
        if hosted.numel() == 0:
            return out
        slots = slots[hosted]
        order = torch.argsort(slots, stable=True)
        hosted, slots = hosted[order], slots[order]  # grouped by local slot
        rows = hosted // top_k  # [A]
        counts = torch.bincount(slots, minlength=len(le.expert_ids))  # [E_l]
        xs = x[rows].to(self.dtype)  # [A, D]
        strategy = self.strategy
        if strategy == "auto":  # (AMX never gets here: with it the whole-layer call above takes every batch)
            kernel_ok = self.dtype == torch.float32 and x.device.type == "cpu" and cpu_kernels.available()
            path = choose_expert_path(int(counts.max()), le.w13.dtype, kernel_ok)
            strategy = path if path != "torch" else _pick_strategy(counts, slots.numel(), x.is_cuda)
        if strategy == "kernel":
            offs = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [E_l + 1] row offsets per slot
            ys = cpu_kernels.moe_swiglu(xs.contiguous(), offs, le.w13, le.w2)
        elif strategy == "padded":
            ys = _padded_swiglu(xs, slots, counts, le)
        elif strategy == "looped":
            ys = _looped_swiglu(xs, counts, le)
        else:
            ys = _grouped_swiglu(xs, counts.cumsum(0).to(torch.int32), le)
        ys = ys * topk_weights.reshape(-1)[hosted].unsqueeze(1).to(ys.dtype)  # [A, D]
        out.index_add_(0, rows, ys.to(out.dtype))
        return out

    def _whole_layer_kernel(self, le: _LayerExperts, x: torch.Tensor, amx_ok: bool) -> bool:
        """Whether the layer runs as one C call, bookkeeping included: no expert can get more rows than the
        batch has (each token picks distinct experts; a repeated id would only cost speed, never correctness),
        so T within the kernel's limit decides it with no host read of the routing; with AMX there is no limit
        (the C call itself gives AMX the experts with AMX_MIN_ROWS rows or more). The caller has checked
        _layer_kernel_ok."""
        return x.dtype == torch.float32 and \
            choose_expert_path(x.shape[0], le.w13.dtype, True, amx_ok) in ("kernel", "amx")

    def _amx_ok(self, le: _LayerExperts) -> bool:
        """bf16 experts this CPU shard (kernels usable: _layer_kernel_ok) may run on AMX tiles: its strategy is
        free to choose, AMX usable here, the shapes tile."""
        return (self.strategy == "auto" and le.w13.dtype == torch.bfloat16
                and amx_fits(le.w13.shape[2], le.w2.shape[2]) and cpu_kernels.amx_ready())

    def _layer_kernel_ok(self, le: _LayerExperts, x: torch.Tensor) -> bool:
        """A CPU shard computing in fp32 with the C kernels built, its strategy free to take them."""
        return (self.strategy in ("auto", "kernel") and self.dtype == torch.float32 and x.device.type == "cpu"
                and le.slot_of.device.type == "cpu" and cpu_kernels.available())


def _contiguous(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` in ``dtype`` (default its own), contiguous: itself when it is already (each torch call costs ~0.3 us)."""
    if (dtype is None or t.dtype == dtype) and t.is_contiguous():
        return t
    return t.to(dtype or t.dtype).contiguous()


def _local_slots(le: _LayerExperts, topk_idx: torch.Tensor) -> torch.Tensor:
    """[T, K] local slot of each assignment, -1 where skipped or not hosted; on the device, no host read.

    index_select, not ``slot_of[ids]``: the same gather, and the one that also runs on fake CUDA tensors.
    """
    flat = topk_idx.reshape(-1).long()  # [T*K]
    slots = le.slot_of.index_select(0, flat.clamp(min=0))  # [T*K]
    return torch.where(flat >= 0, slots, -1).view(topk_idx.shape)


def _pad_fp8(w: Fp8Tensor, rows: int | None, cols: int | None) -> Fp8Tensor:
    """``w`` grown to ``rows`` x ``cols`` with zero weights; new scale blocks get 1 (any scale times 0 is 0)."""
    r, c = w.shape
    rows, cols = rows or r, cols or c
    if (rows, cols) == (r, c):
        return w
    bn, bk = w.block
    # e4m3 zero is the all-zero byte: pad the uint8 view (float8 padding kernels are not everywhere).
    q = F.pad(w.q.view(torch.uint8), (0, cols - c, 0, rows - r)).view(torch.float8_e4m3fn)
    gr, gc = w.scale_inv.shape
    s = F.pad(w.scale_inv, (0, math.ceil(cols / bk) - gc, 0, math.ceil(rows / bn) - gr), value=1.0)
    return Fp8Tensor(q, s, w.block)


def _pick_strategy(counts: torch.Tensor, assignments: int, cuda: bool) -> str:
    """How to run this batch's experts; measured on CPU (see the closing notes of issue [A]).

    On GPUs the grouped GEMM is one kernel. On CPUs torch's grouped GEMM runs one GEMM per
    hosted expert, empty ones included, on one core: decode-sized batches touching most
    experts do better with one padded bmm over every hosted expert (memory-bound weight
    reads spread over all cores, at the price of reading idle experts and padding rows);
    batches touching few experts do better looping over just the busy ones.
    """
    if cuda:
        return "grouped"
    n_experts = counts.numel()
    busy = int((counts > 0).sum())
    if busy * 2 >= n_experts and int(counts.max()) * n_experts <= 4 * assignments + n_experts:
        return "padded"
    return "looped"


def _looped_swiglu(xs: torch.Tensor, counts: torch.Tensor, le: _LayerExperts) -> torch.Tensor:
    """One GEMM pair per busy expert over its contiguous row segment (a loop over experts, not rows)."""
    inter = le.w2.shape[-1]
    out = xs.new_empty(xs.shape[0], le.w2.shape[1])  # [A, D]
    start = 0
    for slot, n in enumerate(counts.tolist()):
        if n:
            w13, w2 = le.w13[slot].to(xs.dtype), le.w2[slot].to(xs.dtype)  # no copy when the dtypes agree
            gate_up = xs[start : start + n] @ w13.t()  # [n, 2I]
            out[start : start + n] = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2.t()
            start += n
    return out


def _grouped_swiglu(xs: torch.Tensor, offs: torch.Tensor, le: _LayerExperts) -> torch.Tensor:
    inter = le.w2.shape[-1]
    gate_up = _grouped_mm(xs, le.w13.to(xs.dtype).transpose(1, 2), offs)  # [A, 2I]
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [A, I]
    return _grouped_mm(h, le.w2.to(xs.dtype).transpose(1, 2), offs)  # [A, D]


def _padded_swiglu(xs: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor, le: _LayerExperts) -> torch.Tensor:
    """Rows laid out [E_l, M, D] (M = most rows of any expert, zeros elsewhere), two bmm's."""
    inter = le.w2.shape[-1]
    starts = counts.cumsum(0) - counts  # [E_l] first assignment of each slot (slots are sorted)
    rank = torch.arange(slots.numel()) - starts[slots]  # [A] row of each assignment within its expert
    padded = xs.new_zeros(counts.numel(), int(counts.max()), xs.shape[1])  # [E_l, M, D]
    padded[slots, rank] = xs
    gate_up = torch.bmm(padded, le.w13.to(xs.dtype).transpose(1, 2))  # [E_l, M, 2I]
    h = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]  # [E_l, M, I]
    return torch.bmm(h, le.w2.to(xs.dtype).transpose(1, 2))[slots, rank]  # [A, D]
