"""Kernel benchmark: each Triton op checked against its reference and timed beside torch at DeepSeek sizes.

    python -m moemesh.kernels.bench [--sizes v2|v3|both] [--dtype bf16|fp16] [--iters N] [--json]
                                    [--ops mla,sparse_mla,store,moe,moe_fp8,route] [--dry-run]

Needs a CUDA GPU; the percentages are of an H200's peaks (4.8 TB/s HBM3e, 989 TFLOP/s dense bf16/fp16,
1979 dense FP8). Per row: the Triton op is checked against its ``*_ref`` (allclose at dtype tolerances;
the store exactly; routing as sets of experts), then it and a torch baseline for the same math
(kernels/bench_baselines.py) are timed with CUDA events (warm-up, L2 flushed before each call, median
of --iters). V3.2's sparse decode reads the latent view of [c_kv | k_pe | indexer key] rows. Bytes
and FLOPs are counted analytically as the minimum traffic (inputs read once, outputs written once,
scratch not counted), so TB/s is a lower bound on what the hardware moved. fused_moe_fp8 is
weight-only FP8 (its dots run in bf16/fp16), so its %peak is of the bf16 peak. Rows print as they
finish (--json: one object per line). Exit status: 0 every check passed, 1 a check failed or a row
raised, 2 no CUDA device.

--dry-run builds every shape's inputs on the CPU at tiny scale and runs only the references and torch
baselines, each baseline checked against its reference: the script's plumbing, without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from moemesh.model.checkpoint import dequantize_fp8_blockwise

from .cache_store import store_latent, store_latent_ref
from .fused_moe import fused_moe, fused_moe_fp8, fused_moe_fp8_ref, fused_moe_ref
from .mla_decode import mla_decode, mla_decode_ref
from .bench_baselines import grouped_mm, mla_torch, moe_torch, sparse_mla_torch
from .routing import route, route_ref
from .sparse_mla_decode import sparse_mla_decode, sparse_mla_decode_ref

PEAK_TBS = 4.8  # H200 HBM3e
PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0}  # H200 dense tensor cores
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 1e-2), torch.float32: (1e-4, 1e-4)}  # (atol, rtol)
BASELINE_SLACK = 10  # torch baselines keep low-precision intermediates (bf16 scores, GEMM outputs): 10x tolerances
MLA_C, MLA_R, MLA_BLOCK = 512, 64, 64  # kv_lora_rank, qk_rope_head_dim, cache block size
MLA_SCALE = 192**-0.5 * (0.1 * math.log(40) + 1) ** 2  # V3: qk_head_dim 192, yarn (factor 40) mscale squared
DSA_TOPK, DSA_KEY = 2048, 128  # DeepSeek-V3.2: index_topk, index_head_dim (its key ends each cache row)
MOE = {"v2-lite": (64, 6, 2048, 1408), "v2": (160, 6, 5120, 1536), "v3": (256, 8, 7168, 2048)}  # E, K, D, I
FP8_BLOCK = 128
ROUTE = {  # model -> (routed experts, route() arguments)
    "v2-lite": (64, dict(top_k=6, scoring_func="softmax", topk_method="greedy")),
    "v2": (160, dict(top_k=6, scoring_func="softmax", topk_method="group_limited_greedy", n_group=8, topk_group=3,
                     routed_scaling_factor=16.0)),
    "v3": (256, dict(top_k=8, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
                     norm_topk_prob=True, routed_scaling_factor=2.5)),
}  # fmt: skip
OPS = ("mla", "sparse_mla", "store", "moe", "moe_fp8", "route")
NO_GPU = "moemesh.kernels.bench needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run checks the script on CPU"
COLUMNS = f"{'op':<14}{'model':<8}{'shape':<50}{'ok':<5}{'triton ms':>10}{'torch ms':>10}{'speedup':>8}"
COLUMNS += f"{'TB/s':>7}{'%bw':>6}{'TFLOP/s':>9}{'%peak':>7}  torch baseline"


# ---- the bench -------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.dry = args, args.dry_run
        self.dev = torch.device("cpu" if self.dry else "cuda")
        self.dtype = DTYPES[args.dtype]
        self.models = {"v2": ["v2-lite", "v2"], "v3": ["v3"], "both": ["v2-lite", "v2", "v3"]}[args.sizes]
        self.device_name = "cpu (dry run)" if self.dry else torch.cuda.get_device_name(self.dev)
        self.flush = None if self.dry else torch.empty(256 << 20, dtype=torch.int8, device=self.dev)  # > L2
        self.rows = self.failed = 0
        self._gmm_ok: bool | None = None

    def n(self, full: int, div: int, align: int = 1) -> int:
        """A dimension at full scale, or for --dry-run shrunk by ``div`` (rounded up to a multiple of ``align``)."""
        return -(-max(1, full // div) // align) * align if self.dry else full

    def randn(self, *shape, dtype=None, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype or self.dtype, device=self.dev).mul_(scale)

    # ---- measuring

    def time_ms(self, fn) -> float:
        """Median ms of ``fn()`` over --iters calls (CUDA events, L2 flushed before each); dry run: one call."""
        if self.dry:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        for _ in range(self.args.warmup):
            fn()
        torch.cuda.synchronize()
        events = []
        for _ in range(self.args.iters):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)

    def close(self, out, want, slack=1):
        atol, rtol = TOL[self.dtype if out.dtype.itemsize < 4 else torch.float32]
        a, b = out.float(), want.float()
        err = (a - b).abs().max().item() if a.numel() else 0.0
        return bool(torch.allclose(a, b, atol=atol * slack, rtol=rtol * slack)), err

    @staticmethod
    def exact(out, want, slack=1):
        return bool(torch.equal(out, want)), (out.float() - want.float()).abs().max().item()

    @staticmethod
    def same_routing(out, want, slack=1):
        """Same expert sets per token (near-ties may swap: at most 0.1% of rows), weights close on the rest."""
        (ia, wa), (ib, wb) = out, want
        ia, oa = ia.sort(dim=1)
        ib, ob = ib.sort(dim=1)
        same = (ia == ib).all(dim=1)
        wa, wb = wa.float().gather(1, oa)[same], wb.float().gather(1, ob)[same]
        err = (wa - wb).abs().max().item() if wa.numel() else 0.0
        bad = int((~same).sum())
        return bad <= len(same) // 1000 and bool(torch.allclose(wa, wb, atol=1e-5 * slack, rtol=1e-4 * slack)), err

    def rates(self, ms, nbytes, flops, peak):
        if not ms:
            return None, None, None, None
        tbs, tfl = nbytes / ms / 1e9, (flops / ms / 1e9 if flops else None)
        return round(tbs, 3), round(100 * tbs / PEAK_TBS, 1), tfl and round(tfl, 2), tfl and round(100 * tfl / peak, 1)

    def row(self, op, model, shape, *, ref, kernel, baseline, impl, compare, nbytes, flops=None, peak="bf16"):
        """Check and time one shape. ref/kernel/baseline: zero-argument callables returning the op's output."""
        r = dict(op=op, model=model, shape=shape, dtype=self.args.dtype, device=self.device_name, ok=False,
                 max_err=None, ms_triton=None, ms_torch=None, torch_impl=impl, torch_err=None, speedup=None,
                 bytes=nbytes, flops=flops, peak_tflops=PEAK_TFLOPS[peak])  # fmt: skip
        try:
            want = ref()
            if not self.dry:
                r["ok"], r["max_err"] = compare(kernel(), want)
                r["ms_triton"] = self.time_ms(kernel)
            base_ok, r["torch_err"] = compare(baseline(), want, BASELINE_SLACK)
            r["ok"] = base_ok if self.dry else r["ok"]
            del want
            r["ms_torch"] = self.time_ms(baseline)
        except Exception as exc:  # keep going: one bad shape must not cost the other figures
            r["ok"], r["error"] = False, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            if not self.dry:
                torch.cuda.empty_cache()
        if r["ms_triton"] and r["ms_torch"]:
            r["speedup"] = round(r["ms_torch"] / r["ms_triton"], 2)
        peak_tflops = r["peak_tflops"]
        r["tb_s"], r["pct_bw"], r["tflops"], r["pct_flops"] = self.rates(r["ms_triton"], nbytes, flops, peak_tflops)
        r["torch_tb_s"], _, r["torch_tflops"], _ = self.rates(r["ms_torch"], nbytes, flops, peak_tflops)
        self.rows, self.failed = self.rows + 1, self.failed + (not r["ok"])
        self.emit(r)

    def emit(self, r: dict) -> None:
        if self.args.json:
            print(json.dumps(r), flush=True)
            return

        def f(v, spec):
            return "-" if v is None else format(v, spec)

        ok = "ok" if r["ok"] else "FAIL"
        line = f"{r['op']:<14}{r['model']:<8}{r['shape']:<50}{ok:<5}{f(r['ms_triton'], '.4f'):>10}"
        line += f"{f(r['ms_torch'], '.4f'):>10}{f(r['speedup'], '.2f'):>8}"
        line += f"{f(r['tb_s'], '.2f'):>7}{f(r['pct_bw'], '.1f'):>6}"
        line += f"{f(r['tflops'], '.1f'):>9}{f(r['pct_flops'], '.1f'):>7}  {r['torch_impl']}"
        print(line + (f"  [{r['error']}]" if "error" in r else ""), flush=True)

    # ---- ops

    def mla(self) -> None:
        """Absorbed MLA decode over a paged cache (shuffled blocks), every sequence at the same length."""
        C, R, bs, e = self.n(MLA_C, 16), self.n(MLA_R, 8), self.n(MLA_BLOCK, 8), self.dtype.itemsize
        heads = {"v2-lite": 16, "v2": 128, "v3": 128}
        labels: dict[int, list[str]] = {}
        for m in self.models:
            labels.setdefault(heads[m], []).append(m)
        for H, names in sorted(labels.items()):
            for B in (1, 32, 128):
                for L in (1024, 4096, 16384):
                    b, h, ctx = self.n(B, 8), self.n(H, 8), self.n(L, 256)
                    n_blocks = -(-ctx // bs)
                    kv = self.randn(b * n_blocks * bs, C + R)
                    tables = torch.randperm(b * n_blocks, device=self.dev).view(b, n_blocks).to(torch.int32)
                    lens = torch.full((b,), ctx, dtype=torch.int32, device=self.dev)
                    args = (self.randn(b, h, C), self.randn(b, h, R), kv, tables, lens, bs, MLA_SCALE)
                    nbytes = e * (b * ctx * (C + R) + b * h * (2 * C + R)) + 4 * (tables.numel() + b)
                    self.row("mla_decode", "/".join(names), f"B={b} H={h} L={ctx} C={C} R={R} block={bs}",
                             ref=lambda: mla_decode_ref(*args), kernel=lambda: mla_decode(*args),
                             baseline=lambda: mla_torch(*args, ctx), impl="gather+bmm+softmax", compare=self.close,
                             nbytes=nbytes, flops=2 * b * h * ctx * (2 * C + R))  # fmt: skip
                    del kv, tables, lens, args

    def sparse_mla(self) -> None:
        """V3.2's decode over each query's top-k rows of a long context, on the strided latent view of its
        [c_kv | k_pe | indexer key] rows (shuffled blocks, random distinct positions per sequence)."""
        if "v3" not in self.models:
            return
        C, R, Di, bs = self.n(MLA_C, 16), self.n(MLA_R, 8), self.n(DSA_KEY, 8), self.n(MLA_BLOCK, 8)
        h, topk, e = self.n(128, 8), self.n(DSA_TOPK, 128), self.dtype.itemsize
        for B in (1, 32, 128):
            for L in (8192, 32768):
                b, ctx = self.n(B, 8), self.n(L, 256)
                n_blocks = -(-ctx // bs)
                rows = self.randn(b * n_blocks * bs, C + R + Di)
                tables = torch.randperm(b * n_blocks, device=self.dev).view(b, n_blocks).to(torch.int32)
                lens = torch.full((b,), ctx, dtype=torch.int32, device=self.dev)
                picks = torch.rand(b, ctx, device=self.dev).topk(min(topk, ctx), dim=1).indices.to(torch.int32)
                args = (self.randn(b, h, C), self.randn(b, h, R), rows[:, : C + R], tables, lens, picks, bs, MLA_SCALE)
                nbytes = e * (b * topk * (C + R) + b * h * (2 * C + R)) + 4 * b * (topk + 1)
                self.row("sparse_mla", "v3.2", f"B={b} H={h} L={ctx} topk={topk} C={C} R={R} key={Di}",
                         ref=lambda: sparse_mla_decode_ref(*args), kernel=lambda: sparse_mla_decode(*args),
                         baseline=lambda: sparse_mla_torch(*args), impl="gather+bmm+softmax", compare=self.close,
                         nbytes=nbytes, flops=2 * b * h * topk * (2 * C + R))  # fmt: skip
                del rows, tables, lens, picks, args

    def store(self) -> None:
        """Scatter T new tokens' [c_kv | k_pe] rows into a 1M-slot cache at random distinct slots."""
        C, R, e = self.n(MLA_C, 16), self.n(MLA_R, 8), self.dtype.itemsize
        slots = self.n(1 << 20, 1024)
        caches = [torch.zeros(slots, C + R, dtype=self.dtype, device=self.dev) for _ in range(3)]
        for T in (32, 512, 8192):
            t = self.n(T, 32)
            c_kv, k_pe = self.randn(t, C), self.randn(t, R)
            slot = torch.randperm(slots, device=self.dev)[:t]
            for cache in caches:
                cache.zero_()
            ref_kv, tri_kv, torch_kv = caches

            def put():
                return torch_kv.index_put_((slot,), torch.cat([c_kv, k_pe], dim=-1))

            self.row("store_latent", "all", f"T={t} C={C} R={R} slots={slots}",
                     ref=lambda: (store_latent_ref(ref_kv, c_kv, k_pe, slot), ref_kv)[1],
                     kernel=lambda: (store_latent(tri_kv, c_kv, k_pe, slot), tri_kv)[1],
                     baseline=put, impl="index_put", compare=self.exact,
                     nbytes=2 * e * t * (C + R) + 8 * t)  # fmt: skip

    def grouped_mm_ok(self) -> bool:
        """Whether torch's grouped_mm runs here in this dtype (else the baseline is the reference loop)."""
        if self._gmm_ok is None:
            try:
                a, b = self.randn(32, 64), self.randn(2, 64, 64)
                offs = torch.tensor([16, 32], dtype=torch.int32, device=self.dev)
                self._gmm_ok = grouped_mm() is not None and grouped_mm()(a, b.mT, offs=offs).shape == (32, 64)
            except Exception:
                self._gmm_ok = False
        return self._gmm_ok

    def quantized(self, E, N, Kd, blk):
        """Random DeepSeek-V3-style FP8 weights [E, N, Kd] with one fp32 scale_inv per blk x blk block."""
        q = torch.empty(E, N, Kd, dtype=torch.float8_e4m3fn, device=self.dev)
        s = torch.empty(E, N // blk, Kd // blk, dtype=torch.float32, device=self.dev)
        for e0 in range(0, E, 16):
            w = self.randn(min(16, E - e0), N // blk, blk, Kd // blk, blk, dtype=torch.float32, scale=Kd**-0.5)
            amax = w.abs().amax(dim=(2, 4), keepdim=True).clamp_min(1e-12)
            q[e0 : e0 + w.shape[0]] = (w * (448.0 / amax)).to(torch.float8_e4m3fn).view(-1, N, Kd)
            s[e0 : e0 + w.shape[0]] = (amax / 448.0).view(-1, N // blk, Kd // blk)
        deq = torch.empty(E, N, Kd, dtype=self.dtype, device=self.dev)
        for i in range(E):  # moemesh.model.checkpoint's dequantization, as fused_moe_fp8_ref does it
            deq[i] = dequantize_fp8_blockwise(q[i], s[i], (blk, blk)).to(self.dtype)
        return q, s, deq

    def moe(self, fp8: bool = False) -> None:
        """Routed-expert SwiGLU, T tokens routed uniformly at random to K of E experts."""
        op = "fused_moe_fp8" if fp8 else "fused_moe"
        e = self.dtype.itemsize
        for m in [m for m in self.models if m == "v3"] if fp8 else self.models:  # FP8: DeepSeek-V3's format
            E, K, D, I = MOE[m]
            n_exp, d, inter, blk = self.n(E, 8), self.n(D, 64, 16), self.n(I, 64, 16), self.n(FP8_BLOCK, 8)
            if fp8:
                q13, s13, w13 = self.quantized(n_exp, 2 * inter, d, blk)
                q2, s2, w2 = self.quantized(n_exp, d, inter, blk)
            else:
                w13 = self.randn(n_exp, 2 * inter, d, scale=d**-0.5)
                w2 = self.randn(n_exp, d, inter, scale=inter**-0.5)
            gmm = self.grouped_mm_ok()
            for T in (16, 256, 2048):
                t = self.n(T, 16)
                x = self.randn(t, d)
                idx = torch.rand(t, n_exp, device=self.dev).topk(K, dim=1).indices
                wts = torch.softmax(self.randn(t, K, dtype=torch.float32), dim=-1)
                active = idx.unique().numel()
                if fp8:
                    ref = (lambda: fused_moe_fp8_ref(x, q13, s13, q2, s2, idx, wts, (blk, blk))) if self.dry else (
                        lambda: fused_moe_ref(x, w13, w2, idx, wts))  # the same values, without a 45 GB fp32 copy
                    kernel = lambda: fused_moe_fp8(x, q13, s13, q2, s2, idx, wts, (blk, blk), check_ids=False)  # noqa: E731
                    weight_bytes = active * 3 * inter * d + 4 * (s13[0].numel() + s2[0].numel()) * active
                else:
                    ref = lambda: fused_moe_ref(x, w13, w2, idx, wts)  # noqa: E731
                    kernel = lambda: fused_moe(x, w13, w2, idx, wts, check_ids=False)  # noqa: E731
                    weight_bytes = active * 3 * inter * d * e
                self.row(op, m, f"T={t} E={n_exp} K={K} D={d} I={inter}" + (f" blk={blk}" if fp8 else ""),
                         ref=ref, kernel=kernel, compare=self.close,
                         baseline=(lambda: moe_torch(x, w13, w2, idx, wts)) if gmm else ref,
                         impl=("grouped_mm" if gmm else "reference loop") + (f" ({self.args.dtype} deq.)" if fp8 else ""),
                         nbytes=weight_bytes + 2 * e * t * d + 12 * t * K, flops=6 * t * K * d * inter)  # fmt: skip
            del w13, w2
            if fp8:
                del q13, s13, q2, s2
            if not self.dry:
                torch.cuda.empty_cache()

    def moe_fp8(self) -> None:
        self.moe(fp8=True)

    def route(self) -> None:
        """Gate selection from fp32 logits (DeepSeek's gates run in fp32), every variant of its model."""
        for m in self.models:
            E, kw = ROUTE[m]
            if kw["topk_method"] == "noaux_tc":
                kw = {**kw, "bias": self.randn(E, dtype=torch.float32, scale=0.1)}
            for T in (16, 1024, 8192):
                t = self.n(T, 64)
                logits = self.randn(t, E, dtype=torch.float32, scale=2.0)
                desc = f"{kw['scoring_func']}/{kw['topk_method']}" + (f" G={kw['n_group']}" if "n_group" in kw else "")
                self.row("route", m, f"T={t} E={E} K={kw['top_k']} {desc}",
                         ref=lambda: route_ref(logits, **kw), kernel=lambda: route(logits, **kw),
                         baseline=lambda: route_ref(logits, **kw), impl="route_ref", compare=self.same_routing,
                         nbytes=4 * t * E + 12 * t * kw["top_k"])  # fmt: skip

    def header(self) -> None:
        mode = "dry run: references and torch baselines only, tiny shapes" if self.dry else (
            f"median of {self.args.iters} after {self.args.warmup} warm-up, L2 flushed")
        print(f"# {self.device_name} | {self.args.dtype} | {mode}")
        print(f"# % of H200 peaks: {PEAK_TBS} TB/s; {PEAK_TFLOPS['bf16']:g} TFLOP/s bf16/fp16 dense "
              f"(FP8 {PEAK_TFLOPS['fp8']:g}; fused_moe_fp8 is weight-only, its dots run in {self.args.dtype})")
        print(COLUMNS, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moemesh.kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", choices=("v2", "v3", "both"), default="both", help="DeepSeek-V2(-Lite) and/or V3 shapes")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=20, help="timed calls per op (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first compiles)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, references and baselines only")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if unknown := sorted(set(ops) - set(OPS)):
        p.error(f"unknown --ops {','.join(unknown)}; choose from {','.join(OPS)}")
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    if not args.dry_run:
        if not torch.cuda.is_available():
            print(NO_GPU, file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("moemesh.kernels.bench: unset TRITON_INTERPRET to time compiled kernels", file=sys.stderr)
            return 2
    torch.manual_seed(0)
    bench = Bench(args)
    if not args.json:
        bench.header()
    for op in ops:
        getattr(bench, op)()
    if not args.json:
        print(f"# {bench.rows} rows, {bench.failed} failed", flush=True)
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
