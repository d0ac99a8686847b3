"""Wall-clock per-stage profile of the single-process decode step on CPU (issue 19's gap to the roofline).

    .venv/bin/python scripts/profile_cpu_step.py --model /tmp/qb-v2lite --batch 16 --dtype float32 [--threads 2]

Builds the engine as ``moemesh bench`` does, runs ``--batch`` random prompts to the decode phase, then times
``--steps`` decode steps with wall-clock timers around the model's stages (exclusive time: a stage's own time,
less the stages nested in it), the C calls inside them, and the engine's remainder (scheduling, planning,
upload, sampler, Python). Also: the number of C calls and torch ops per step, and the fixed cost of one C call
(ctypes + an OpenMP parallel region) measured with a tiny product, so "dispatch overhead" has a figure.
Every stage runs synchronously on CPU, so wall time around a call is its cost.
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

from moemesh.cli.huge_pages import ask_for_huge_pages

ask_for_huge_pages()  # as every moemesh process does, before torch loads: weights in 2 MB pages

import torch  # noqa: E402


class StageClock:
    """Exclusive wall time per nested stage path ("MLA/linear"), summed over the timed steps."""

    def __init__(self):
        self.on = False
        self.stack: list[str] = []
        self.child_s: list[float] = []
        self.excl: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        clock = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not clock.on:
                return fn(*args, **kwargs)
            path = "/".join(clock.stack + [label]) if clock.stack else label
            clock.stack.append(label)
            clock.child_s.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                children = clock.child_s.pop()
                clock.stack.pop()
                clock.excl[path] += dt - children
                clock.calls[path] += 1
                if clock.child_s:
                    clock.child_s[-1] += dt

        setattr(owner, attr, timed)


def instrument(clock: StageClock, engine) -> None:
    from moemesh.attn_node import model as m
    from moemesh.kernels import cpu_kernels

    clock.wrap(m.MLA, "forward", "MLA")
    clock.wrap(m.MLA, "_decode", "decode")
    from moemesh.kernels import cpu_mla_layer

    clock.wrap(cpu_mla_layer.cpu_kernels, "mla_layer", "C.mla_layer")
    clock.wrap(m.MLP, "forward", "MLP")
    clock.wrap(m.Gate, "forward", "gate")
    clock.wrap(m.Linear, "forward", "linear")
    clock.wrap(m.RMSNorm, "forward", "rmsnorm")
    clock.wrap(m.Rotary, "apply", "rope")
    clock.wrap(m.Transformer, "logits", "lm_head")
    clock.wrap(m.Transformer, "_layers", "layers")  # a generator: only its creation, counted in "other"
    for name in ("linear", "swiglu", "moe_forward", "moe_swiglu", "rmsnorm", "mla_decode", "rope", "store_latent"):
        clock.wrap(cpu_kernels, name, f"C.{name}")
    backend = engine.backend
    clock.wrap(backend, "dispatch", "routed")
    clock.wrap(backend, "combine", "routed.combine")
    import moemesh.attn_node.engine as eng

    clock.wrap(eng, "sample_step", "sampler")


def call_overhead_us(threads: int, reps: int = 2000) -> dict[str, float]:
    """Fixed cost of one C call: a tiny mm_linear (one OpenMP region) at 1 and ``threads`` threads, and
    mm_rmsnorm (no region) on one row, in microseconds per call (best of 5 runs of ``reps``)."""
    from moemesh.kernels import cpu_kernels

    x, w, wn = torch.randn(1, 16), torch.randn(8, 16), torch.ones(16)
    out = {}
    for label, fn in (("linear 1 thread", lambda: cpu_kernels.linear(x, w, threads=1)),
                      (f"linear {threads} threads", lambda: cpu_kernels.linear(x, w, threads=threads)),
                      ("rmsnorm (no parallel region)", lambda: cpu_kernels.rmsnorm(x, wn, 1e-6)),
                      ("torch.add of two [16, 512]", functools.partial(torch.add, torch.ones(16, 512),
                                                                      torch.ones(16, 512)))):
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps)
        out[label] = best * 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/qb-v2lite")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3, help="timed runs; the quickest's stages are printed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from moemesh.launch.embedded import build_local
    from moemesh.sampling import SamplingParams

    torch.manual_seed(0)
    mesh = build_local(args.model, args.dtype, progress=False)
    engine = mesh.engine
    clock = StageClock()
    instrument(clock, engine)
    vocab = mesh.cfg.vocab_size
    prompts = torch.randint(2, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=args.steps + 2, temperature=0.0, ignore_eos=True)
    best = None
    for _ in range(args.rounds + 1):  # the first run warms up
        for pr in prompts.tolist():
            engine.add_request(pr, params)
        engine.step()  # prefill
        engine.step()
        clock.excl.clear(), clock.calls.clear()
        clock.on = True
        total = 0.0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if best is None else \
                _nothing() as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            total = time.perf_counter() - t0
        clock.on = False
        ops_per_step = None
        if prof is not None:
            ops_per_step = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / args.steps
        while engine.has_unfinished():
            engine.step()
        if best is None or total < best[0]:
            best = (total, dict(clock.excl), dict(clock.calls), ops_per_step or (best[3] if best else None))
    total, excl, calls, ops_per_step = best
    n = args.steps
    step_ms = total / n * 1e3
    print(f"batch {args.batch}, {args.dtype}, {args.threads} threads: decode step {step_ms:.2f} ms (quickest of "
          f"{args.rounds} runs of {n} steps); aten ops per step (first timed run, under the profiler) "
          f"{ops_per_step:.0f}")
    print(f"{'stage (exclusive wall time)':44}{'ms/step':>9}{'calls/step':>12}{'us/call':>9}")
    for path, s in sorted(excl.items(), key=lambda kv: -kv[1]):
        c = calls[path] / n
        print(f"{path:44}{s / n * 1e3:9.2f}{c:12.1f}{s / calls[path] * 1e6:9.1f}")
    timed = sum(excl.values()) / n * 1e3
    print(f"{'other (embedding, residual adds, scheduler, planning, upload, Python)':44}{step_ms - timed:9.2f}")
    c_calls = sum(v for k, v in calls.items() if k.rsplit('/', 1)[-1].startswith("C.")) / n
    print(f"C calls per step: {c_calls:.0f}")
    for label, us in call_overhead_us(args.threads).items():
        print(f"fixed cost per call, {label}: {us:.1f} us")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
