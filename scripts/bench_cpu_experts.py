"""Candidates for the CPU routed-expert compute, in one run: GB/s of weight bytes read per pass.

Shapes are the V2-Lite miniature's (D 512, I 256, 64 experts x 7 MoE layers: 660 MB fp32, more than the
last-level cache), every expert given M rows. Beside them, the streaming read (x.sum() over 256 MB fp32)
measured in the same run, on the same threads. The candidates: F.linear per expert (torch's GEMV/GEMM
paths; over bf16 weights with bf16 activations, or upcast per call), the rows grouped per expert (one
padded bmm, F.grouped_mm), torch.compile (inductor's CPU code, compiled once per shape: its compile time
is printed), the C kernel (kernels/cpu_gemv.c) and, for bf16 on a CPU with AMX, its AMX twin (kernels/
cpu_amx.c: prefill-sized rows). ``--linear`` instead: the attention side's linear
(512 x 512) from decode to prefill rows, the kernel (every row count: batch invariance) against F.linear.
Run: .venv/bin/python scripts/bench_cpu_experts.py [--rows 1 2 4 8 16 64] [--compile] [--linear].
Figures are noisy on shared machines: candidates run interleaved, the quickest of --reps counts.
"""

from __future__ import annotations

import argparse
import time

from moemesh.cli.huge_pages import ask_for_huge_pages

ask_for_huge_pages()  # as every moemesh process does, before torch loads: weights in 2 MB pages

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moemesh.kernels import cpu_kernels  # noqa: E402

D, I, E, LAYERS = 512, 256, 64, 7


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def stream_gbps(reps: int) -> float:
    x = torch.ones(64 * 1024 * 1024)  # 256 MB fp32
    return x.numel() * 4 / best(lambda: x.sum(), reps) / 1e9


def swiglu(x, w13, w2):
    gu = F.linear(x, w13)
    return F.linear(F.silu(gu[:, :I]) * gu[:, I:], w2)


def candidates(m: int, dtype: torch.dtype, layers, use_compile: bool, compile_s: dict):
    xs = torch.randn(E * m, D)
    offs = torch.arange(0, E * m + 1, m, dtype=torch.int64)
    out = {}

    def looped():
        for w13, w2 in layers:
            for e in range(E):
                swiglu(xs[e * m:(e + 1) * m], w13[e], w2[e])

    def looped_native():  # activations in the weights' dtype (today's --dtype bfloat16 on CPU)
        xn = xs.to(dtype)
        for w13, w2 in layers:
            for e in range(E):
                swiglu(xn[e * m:(e + 1) * m], w13[e], w2[e])

    def looped_upcast():
        for w13, w2 in layers:
            for e in range(E):
                swiglu(xs[e * m:(e + 1) * m], w13[e].float(), w2[e].float())

    def padded():
        xp = xs.view(E, m, D)
        for w13, w2 in layers:
            gu = torch.bmm(xp.to(w13.dtype), w13.transpose(1, 2))
            torch.bmm(F.silu(gu[..., :I]) * gu[..., I:], w2.transpose(1, 2))

    def grouped():
        offs32 = offs[1:].to(torch.int32)
        xn = xs.to(dtype)
        for w13, w2 in layers:
            gu = F.grouped_mm(xn, w13.transpose(1, 2), offs=offs32)
            F.grouped_mm(F.silu(gu[:, :I]) * gu[:, I:], w2.transpose(1, 2), offs=offs32)

    def kernel():
        for w13, w2 in layers:
            cpu_kernels.moe_swiglu(xs, offs, w13, w2)

    if dtype == torch.float32:
        out["F.linear per expert"] = looped
    else:
        out["F.linear per expert, bf16 activations"] = looped_native
        out["F.linear per expert, w.float() per call"] = looped_upcast
    acts = "" if dtype == torch.float32 else ", bf16 activations"  # transformers' bf16 math, not the fp32 run's
    out[f"bmm over all experts (padded){acts}"] = padded
    out[f"F.grouped_mm{acts}"] = grouped
    if cpu_kernels.available():
        out["cpu_gemv.c moe_swiglu"] = kernel
    if dtype == torch.bfloat16 and cpu_kernels.available() and cpu_kernels.amx_ready():
        def amx():
            for w13, w2 in layers:
                cpu_kernels.moe_swiglu_amx(xs, offs, w13, w2)

        out["cpu_amx.c moe_swiglu_amx (AMX tiles)"] = amx
    if use_compile:
        torch._dynamo.reset()  # a fresh compile per shape: its time is what a server pays per shape
        comp = torch.compile(lambda x, a, b: swiglu(x, a.float(), b.float()), dynamic=False)
        t = time.perf_counter()
        comp(xs[:m], layers[0][0][0], layers[0][1][0])
        compile_s_m = time.perf_counter() - t

        def compiled():
            for w13, w2 in layers:
                for e in range(E):
                    comp(xs[e * m:(e + 1) * m], w13[e], w2[e])

        out["torch.compile per expert (inductor)"] = compiled
        compile_s[m] = compile_s_m
    return out


def linear_table(args) -> None:
    """ms per product of the attention side's linear (x [M, 512] @ w [512, 512]^T) per dtype and row count."""
    rows = sorted(set(args.rows) | {512, 2048})
    print(f"\nlinear 512 x 512, ms per product (weights warm in cache); columns: rows")
    print(f"{'candidate':40}" + "".join(f"{m:>8}" for m in rows))
    for name in args.dtypes:
        dtype = getattr(torch, name)
        w = (torch.randn(512, 512) * 0.05).to(dtype)
        fns = {f"{name} F.linear" + (" (w.float() per call)" if dtype != torch.float32 else ""):
               lambda x: F.linear(x, w.float() if dtype != torch.float32 else w)}
        if cpu_kernels.available():
            fns[f"{name} cpu_gemv.c linear"] = lambda x: cpu_kernels.linear(x, w)
        table = {label: {} for label in fns}
        for m in rows:
            x = torch.randn(m, 512)
            for label, fn in fns.items():
                fn(x)
            for label, fn in fns.items():
                table[label][m] = best(lambda: fn(x), args.reps * 3) * 1e3
        for label, by_m in table.items():
            print(f"{label:40}" + "".join(f"{by_m[m]:8.3f}" for m in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also torch.compile (inductor) per expert")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--linear", action="store_true",
                   help="instead: the attention linear (512 x 512) at decode and prefill rows, kernel vs F.linear")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}; streaming read {stream_gbps(args.reps):.1f} GB/s")
    if args.linear:
        linear_table(args)
        return
    for name in args.dtypes:
        dtype = getattr(torch, name)
        layers = [((torch.randn(E, 2 * I, D) * 0.05).to(dtype), (torch.randn(E, D, I) * 0.05).to(dtype))
                  for _ in range(LAYERS)]
        nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in layers)
        rows, compile_s = {}, {}
        for m in args.rows:
            fns = candidates(m, dtype, layers, args.compile, compile_s)
            for fn in fns.values():
                fn()  # warm-up (and compile)
            times = {label: float("inf") for label in fns}
            for _ in range(args.reps):  # interleaved, best of reps: load from other processes hits all alike
                for label, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    times[label] = min(times[label], time.perf_counter() - t)
            for label, t in times.items():
                rows.setdefault(label, {})[m] = nbytes / t / 1e9
        print(f"\n{name} weights ({nbytes / 1e6:.0f} MB), GB/s of weight bytes; columns: rows per expert")
        print(f"{'candidate':52}" + "".join(f"{m:>8}" for m in args.rows))
        for label, by_m in rows.items():
            print(f"{label:52}" + "".join(f"{by_m[m]:8.1f}" for m in args.rows))
        if compile_s:
            print(f"{'torch.compile: seconds to compile the shape':52}"
                  + "".join(f"{compile_s[m]:8.1f}" for m in args.rows))
        print(f"stream now {stream_gbps(args.reps):.1f} GB/s")


if __name__ == "__main__":
    main()
