"""The bandwidth roofline of ``moemesh bench``: weight bytes a decode step reads, against streaming reads.

A decode step is memory-bound wherever weights dominate (CPUs, small batches anywhere): it reads the dense
weights (attention, norms, dense MLPs, shared experts, gates, lm_head) once per forward pass and the routed
experts its tokens were sent to. The experts hit come from the engine's own routing: :class:`ExpertHits`
stands where the MoE layers' load statistics go (``MoE.stats``) and counts, on the model's device, the
distinct experts of each layer in each decode step's dispatch; the counts come to the host once, after the
run (no host read in the step: docs/decode-step.md). The bytes per part are moemesh/model/weight_bytes.py's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moemesh.model.step_flops import compute_step_s
from moemesh.model.weight_bytes import WeightBytes, roofline_fraction, roofline_step_s

STREAM_BYTES = 256 << 20  # well above any L3 (and an H200's 50 MB L2): a read from memory, not cache
MATMUL_N = {"cpu": 2048, "cuda": 8192}  # square products this size reach the library's peak (MKL/oneDNN, cuBLAS)


class ExpertHits:
    """Distinct routed experts per MoE layer, summed over the dispatches made while ``counting``.

    Duck-types :class:`~moemesh.attn_node.load_stats.LoadStats` (``add(layer, topk_idx)``), passing every call
    on to ``inner`` when it stands in front of one. A counted dispatch only keeps a copy of its ``topk_idx`` (one
    op, on the device): the counting runs after the run, in :meth:`per_layer`, so the timed steps carry almost
    none of the measurement's own work (counting in the step cost ~8 small ops per layer, ~0.5 ms a b16 step)."""

    def __init__(self, moe_layers: tuple[int, ...], n_experts: int, device: torch.device, inner=None):
        self.n_experts, self.inner = n_experts, inner
        self._row = {layer: i for i, layer in enumerate(moe_layers)}
        self.device = device
        self._kept: list[tuple[int, torch.Tensor]] = []  # (layer row, [T, K] ids) per counted dispatch
        self.dispatches = 0  # calls counted (host-side: no device read)
        self.counting = False

    def add(self, layer: int, topk_idx: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.add(layer, topk_idx)
        if not self.counting:
            return
        self._kept.append((self._row[layer], topk_idx.clone()))  # a copy: a backend may rewrite ids in place
        self.dispatches += 1

    def reset(self) -> None:
        self._kept.clear()
        self.dispatches = 0

    def per_layer(self) -> list[int]:
        """Distinct experts hit per MoE layer, summed over the counted dispatches: the one host read."""
        hits = torch.zeros(len(self._row), dtype=torch.int64, device=self.device)  # [L_moe]
        for row, topk_idx in self._kept:
            ids = topk_idx.reshape(-1)  # [T * K]
            routed = torch.zeros(self.n_experts, dtype=torch.int64, device=ids.device)  # [E]
            routed.index_add_(0, ids.clamp(min=0), (ids >= 0).to(torch.int64))  # -1 (skip) adds 0
            hits[row] += (routed > 0).sum()
        return hits.tolist()


def attach_hits(model, cfg) -> ExpertHits:
    """Put an :class:`ExpertHits` in front of every MoE layer's load statistics."""
    layers = model.moe_layers()
    inner = layers[0].stats if layers else None
    hits = ExpertHits(cfg.moe_layers, cfg.n_routed_experts, model.device, inner)
    for moe in layers:
        moe.stats = hits
    return hits


@dataclass(frozen=True)
class EngineRun:
    tokens: list[list[int]]  # per prompt, in prompt order
    seconds: float  # the whole run: prefill and decode
    decode_steps: int  # steps in which every scheduled sequence decoded one token
    decode_s: float  # time in those steps
    hits: list[int]  # distinct experts per MoE layer, summed over the decode steps
    dispatches: int  # MoE dispatches in the decode steps (layers x forward passes x steps)


def _decoding_only(engine) -> bool:
    """Whether the next step decodes only: nothing waits to be admitted and every running prompt is cached."""
    sched = engine.scheduler
    return not sched.waiting and all(s.num_cached >= len(s.prompt_ids) for s in sched.running)


def run_metered(engine, hits: ExpertHits, prompts: list[list[int]], params) -> EngineRun:
    """``engine.generate``'s loop, timing decode steps and counting their experts (each step ends in the
    sampler's host read, so a step's wall time is its compute)."""
    hits.reset()
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    steps, decode_s = 0, 0.0
    while engine.has_unfinished():
        hits.counting = decoding = _decoding_only(engine)
        t0 = time.perf_counter()
        events = engine.step()
        if decoding:
            steps, decode_s = steps + 1, decode_s + time.perf_counter() - t0
        for ev in events:
            if ev.error is not None:
                raise ev.error
            out[ev.request_id].append(ev.token_id)
    seconds = time.perf_counter() - start
    hits.counting = False
    return EngineRun([out[rid] for rid in ids], seconds, steps, decode_s, hits.per_layer(), hits.dispatches)


def stream_gbps(device: torch.device, nbytes: int = STREAM_BYTES, repeats: int = 5, reads: int = 4) -> float:
    """Streaming-read bandwidth (GB/s, 1e9 bytes) of ``device`` with this process's torch threads: the best of
    ``repeats`` timings of ``reads`` x ``sum()`` over an ``nbytes`` fp32 buffer, one host read each."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum().item()  # warm-up: pages touched, kernels chosen
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total = x.sum()
        for _ in range(reads - 1):
            total = total + x.sum()
        total.item()
        best = min(best, time.perf_counter() - start)
    del x
    return reads * nbytes / best / 1e9


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Matmul throughput (GFLOP/s, 1e9) of ``device`` in ``dtype`` with this process's torch threads: the best of
    ``repeats`` square ``n`` x ``n`` products (torch's own GEMM: what a well-tuned library gets from the chip)."""
    n = n or MATMUL_N.get(device.type, 4096)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    (a @ b).sum().item()  # warm-up: the library picks its kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        (a @ b)[0, 0].item()  # one element back: the product is done
        best = min(best, time.perf_counter() - start)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the model's allocator gets its memory back (3 x n^2 elements)
    return 2.0 * n ** 3 / best / 1e9


def compute_figures(flops: float, gflops: float, decode_step_ms: float) -> dict:
    """The JSON fields of the compute roofline: a step's FLOPs (moemesh/model/step_flops.py) at the matmul rate."""
    step_ms = compute_step_s(flops, gflops) * 1e3
    return {"flops_per_step": flops, "matmul_gflops": gflops, "compute_step_ms": step_ms,
            "compute_fraction": step_ms / decode_step_ms if decode_step_ms > 0 else 0.0}


def roofline_figures(wb: WeightBytes, run: EngineRun, gbps: float, n_moe_layers: int) -> dict:
    """The JSON fields of the roofline for one metered run."""
    steps = max(run.decode_steps, 1)
    passes = run.dispatches / (steps * n_moe_layers) if n_moe_layers else 1.0  # micro-batches per step
    hit = sum(run.hits) / steps  # (layer, expert) pairs read per step
    step_bytes = wb.step_bytes(hit, passes)
    steps_per_s = run.decode_steps / run.decode_s if run.decode_s > 0 else 0.0
    return {
        "weight_bytes_per_step": step_bytes,
        "dense_weight_bytes_per_pass": wb.dense,
        "expert_bytes": wb.expert,
        "experts_hit_per_layer_per_step": hit / n_moe_layers if n_moe_layers else 0.0,
        "decode_steps": run.decode_steps,
        "decode_steps_per_s": steps_per_s,
        "stream_gbps": gbps,
        "roofline_step_ms": roofline_step_s(step_bytes, gbps) * 1e3,
        "decode_step_ms": 1e3 / steps_per_s if steps_per_s else 0.0,
        "roofline_fraction": roofline_fraction(step_bytes, steps_per_s, gbps),
    }


def print_roofline(r: dict, batch: int, n_experts: int, threads: int) -> None:
    """Lines under bench's table: the bytes of a step, the bandwidth roofline against the step achieved, and
    (when ``r`` has them: bench's whole result) the compute roofline."""
    routed = r["weight_bytes_per_step"] - r["dense_weight_bytes_per_pass"]
    print(f"weights read per decode step: {r['weight_bytes_per_step'] / 1e6:.1f} MB (dense "
          f"{r['dense_weight_bytes_per_pass'] / 1e6:.1f} MB per pass, routed {routed / 1e6:.1f} MB: "
          f"{r['experts_hit_per_layer_per_step']:.1f} of {n_experts} experts per layer)")
    roof_tps = batch * 1e3 / r["roofline_step_ms"]
    print(f"roofline: streaming read {r['stream_gbps']:.1f} GB/s ({threads} threads) -> "
          f"{r['roofline_step_ms']:.1f} ms per step ({roof_tps:.0f} tokens/s); moemesh decode "
          f"{r['decode_step_ms']:.1f} ms per step: {r['roofline_fraction']:.2f} of the roofline")
    if "compute_step_ms" in r:
        bound = "bandwidth" if r["roofline_step_ms"] >= r["compute_step_ms"] else "compute"
        print(f"compute: {r['flops_per_step'] / 1e9:.2f} GFLOP per step at {r['matmul_gflops']:.0f} GFLOP/s "
              f"(torch matmul, {r['compute_dtype']}) -> {r['compute_step_ms']:.1f} ms per step, "
              f"{r['compute_fraction']:.2f} of the step achieved: {bound}-bound")
