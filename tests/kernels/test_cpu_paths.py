"""The CPU expert kernels (kernels/cpu_gemv.c via kernels/cpu_kernels.py) and the per-shape choosers.

The kernel's products are fp32 over exactly widened weights: against float64 math they differ only by fp32
summation order, so the bounds below are a few ulps of the row sums, not a bf16 tolerance.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moemesh.kernels import cpu_kernels
from moemesh.kernels.cpu_paths import (KERNEL_MAX_ROWS_FP32, KERNEL_MAX_ROWS_HALF, choose_expert_path,
                                       choose_linear_path, cpu_linear, cpu_rmsnorm, cpu_swiglu)

from .moe_utils import sorted_experts_ref

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: CPU kernels not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_choose_expert_path():
    assert choose_expert_path(1, torch.float32, True) == "kernel"
    assert choose_expert_path(KERNEL_MAX_ROWS_FP32, torch.float32, True) == "kernel"
    assert choose_expert_path(KERNEL_MAX_ROWS_FP32 + 1, torch.float32, True) == "torch"
    assert choose_expert_path(KERNEL_MAX_ROWS_HALF, torch.bfloat16, True) == "kernel"
    assert choose_expert_path(KERNEL_MAX_ROWS_HALF + 1, torch.float16, True) == "torch"
    assert choose_expert_path(1, torch.bfloat16, False) == "torch"  # no compiler: torch, always correct
    assert choose_expert_path(1, torch.float8_e4m3fn, True) == "torch"


def test_choose_linear_path():
    # every batch size takes the kernel (one summation order per row), so the row count is no input
    assert choose_linear_path(torch.bfloat16, True) == "kernel"
    assert choose_linear_path(torch.float16, True) == "kernel"
    assert choose_linear_path(torch.bfloat16, False) == "upcast"
    assert choose_linear_path(torch.float32, True) == "kernel"
    assert choose_linear_path(torch.float32, False) == "torch"
    assert choose_linear_path(torch.float64, True) == "torch"


def _bound(x: torch.Tensor, w: torch.Tensor) -> float:
    return 1e-6 * float((x.abs().double() @ w.abs().double().t()).max()) + 1e-7


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [0, 1, 2, 3, 5, 17])
@pytest.mark.parametrize("n, k", [(13, 37), (64, 512), (4, 8), (5, 3)])
def test_linear_matches_float64(dtype, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).to(dtype)
    y = cpu_kernels.linear(x, w)
    ref = (x.double() @ w.double().t()).float()
    assert y.shape == (m, n) and y.dtype == torch.float32
    if m:
        assert (y - ref).abs().max() <= _bound(x, w)


@needs_kernel
def test_linear_reads_strided_rows_and_threads_agree():
    x = torch.randn(6, 40)[:, :32]  # row stride 40
    w = torch.randn(9, 32).bfloat16()
    one, two = cpu_kernels.linear(x, w, threads=1), cpu_kernels.linear(x, w, threads=2)
    assert torch.equal(one, two)  # each output is one thread's sum: no order depends on the thread count
    assert (one - (x.double() @ w.double().t()).float()).abs().max() <= _bound(x, w)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", [[3, 0, 1, 5, 2], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1], [0, 9, 0, 0, 0]])
def test_moe_swiglu_matches_float64(dtype, counts):
    g = torch.Generator().manual_seed(sum(counts))
    E, D, I = 5, 24, 12  # neither a multiple of the kernel's 8-wide vectors nor of its 4-row blocks
    w13, w2 = torch.randn(E, 2 * I, D, generator=g).to(dtype), torch.randn(E, D, I, generator=g).to(dtype)
    c = torch.tensor(counts)
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), c.cumsum(0)])
    xs = torch.randn(int(c.sum()), D, generator=g)
    got, ref = cpu_kernels.moe_swiglu(xs, offs, w13, w2), sorted_experts_ref(xs, offs, w13, w2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))


@needs_kernel
def test_kernel_inputs_are_checked():
    w13, w2 = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    xs, offs = torch.randn(3, 8), torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="xs must be a \\[M, 8\\] float32"):
        cpu_kernels.moe_swiglu(xs.double(), offs, w13, w2)
    with pytest.raises(ValueError, match="offs must rise from 0 to 3"):
        cpu_kernels.moe_swiglu(xs, torch.tensor([0, 2, 1]), w13, w2)
    with pytest.raises(ValueError, match="offs must be \\[3\\] int64"):
        cpu_kernels.moe_swiglu(xs, offs.int(), w13, w2)
    with pytest.raises(ValueError, match="share a dtype"):
        cpu_kernels.moe_swiglu(xs, offs, w13, w2.bfloat16())
    with pytest.raises(ValueError, match="are not \\[E, 2I, D\\] and \\[E, D, I\\]"):
        cpu_kernels.moe_swiglu(xs, offs, w13, torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="w must be float32, bfloat16 or float16"):
        cpu_kernels.linear(xs, torch.randn(4, 8).double())
    with pytest.raises(ValueError, match="contiguous 2-d CPU tensor"):
        cpu_kernels.linear(xs, torch.randn(8, 4).t())


_OUT_OF_MEMORY = """
import resource, torch
from moemesh.kernels import cpu_kernels
t, k, d, i, e = 4096, 6, 512, 256, 8
x, w = torch.randn(t, d), torch.rand(t, k)
idx = torch.randint(0, e, (t, k))
w13, w2 = torch.randn(e, 2 * i, d), torch.randn(e, d, i)
tables = cpu_kernels.expert_tables(torch.arange(e), w13, w2)
cpu_kernels.moe_forward_tables(x[:4], idx[:4], w[:4], tables, threads=1)  # built and warm
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + (24 << 20), resource.RLIM_INFINITY))  # out fits, the sorted rows not
try:
    cpu_kernels.moe_forward_tables(x, idx, w, tables, threads=1)
except MemoryError as exc:
    print("MemoryError:", exc)
"""


def test_a_layer_too_large_for_memory_raises_instead_of_crashing():
    # 24576 routed rows need ~125 MB of sorted rows and hiddens in C: under a 24 MB allowance the C call's
    # allocations fail, and the call says so (it used to write through a NULL pointer)
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MemoryError: the CPU expert kernel could not allocate its buffers for 4096 rows" in proc.stdout


def test_expert_tables_are_checked_once_and_the_rows_every_call():
    w13, w2, slot_of = torch.randn(2, 8, 8), torch.randn(2, 8, 4), torch.tensor([1, -1, 0])
    with pytest.raises(ValueError, match="are not \\[E, 2I, D\\] and \\[E, D, I\\]"):
        cpu_kernels.expert_tables(slot_of, w13, torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="slot_of must be a contiguous \\[3\\] torch.int64"):
        cpu_kernels.expert_tables(slot_of.int(), w13, w2)
    tables = cpu_kernels.expert_tables(slot_of, w13, w2)
    x, idx, w = torch.randn(3, 8), torch.tensor([[0, 2], [1, -1], [2, 0]]), torch.rand(3, 2)
    assert torch.equal(cpu_kernels.moe_forward_tables(x, idx, w, tables),
                       cpu_kernels.moe_forward(x, idx, w, slot_of, w13, w2))
    with pytest.raises(ValueError, match="x must be a \\[M, 8\\] float32"):
        cpu_kernels.moe_forward_tables(torch.randn(3, 7), idx, w, tables)
    with pytest.raises(ValueError, match="topk_weights must be a contiguous \\[3, 2\\] torch.float32"):
        cpu_kernels.moe_forward_tables(x, idx, w.double(), tables)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 32), (2, 3, 32), (KERNEL_MAX_ROWS_HALF + 1, 32)])
def test_cpu_linear_equals_fp32_math_on_the_widened_weight(dtype, shape):
    # Every path: the kernel for small row counts, torch (over an fp32 copy for half weights) past them or
    # without a compiler.
    x, w = torch.randn(*shape), torch.randn(24, 32).to(dtype)
    got = cpu_linear(x, w)
    ref = F.linear(x.double(), w.double()).float()
    assert got.shape == (*shape[:-1], 24) and got.dtype == torch.float32
    assert (got - ref).abs().max() <= _bound(x.reshape(-1, 32), w)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_attention_side_bits_do_not_depend_on_its_batch(dtype):
    """cpu_linear, cpu_swiglu and cpu_rmsnorm give the first rows the bits they get alone in batches on both
    sides of every former row limit (16, 64) and of the kernel's row tiles and SwiGLU calls (64 rows)."""
    g = torch.Generator().manual_seed(5)
    D, I = 40, 24
    x = torch.randn(200, D, generator=g)
    w = torch.randn(I, D, generator=g).to(dtype)
    w1, w3, w2 = (torch.randn(*s, generator=g).to(dtype) for s in ((I, D), (I, D), (D, I)))
    norm_w = torch.randn(D, generator=g)
    ops = {"linear": lambda v: cpu_linear(v, w), "swiglu": lambda v: cpu_swiglu(v, w1, w3, w2),
           "rmsnorm": lambda v: cpu_rmsnorm(v, norm_w, 1e-6)}
    for name, op in ops.items():
        alone = torch.cat([op(x[r:r + 1]) for r in range(3)])
        for rows in (2, 3, 16, 17, 64, 65, 129, 200):
            got = op(x[:rows])
            assert torch.equal(got[:min(rows, 3)], alone[:min(rows, 3)]), (name, rows)
            if rows > 64:  # a row past the first tile and call too
                assert torch.equal(got[rows - 1:rows], op(x[rows - 1:rows])), (name, rows)


def test_no_compiler_falls_back_with_a_log_line(monkeypatch, capsys):
    monkeypatch.setattr(cpu_kernels, "find_compiler", lambda: None)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.load() is None and not cpu_kernels.available()
    assert "cpu_kernels_unavailable" in "".join(capsys.readouterr())
    x, w = torch.randn(3, 16), torch.randn(5, 16).bfloat16()
    torch.testing.assert_close(cpu_linear(x, w), F.linear(x, w.float()))  # plain torch, still correct


def test_cpu_linear_reads_strided_rows():
    x = torch.randn(5, 48)[:, 8:40]  # a column slice: unit column stride, row stride 48
    w = torch.randn(6, 32).bfloat16()
    assert (cpu_linear(x, w) - F.linear(x.double(), w.double()).float()).abs().max() <= _bound(x, w)
    xt = torch.randn(32, 5).t()  # column stride 5: copied first
    assert (cpu_linear(xt, w) - F.linear(xt.double(), w.double()).float()).abs().max() <= _bound(xt, w)


def test_a_failed_build_falls_back(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MOEMESH_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "SOURCE", tmp_path / "broken.c")
    (tmp_path / "broken.c").write_text("this is not C\n")
    if cpu_kernels.find_compiler() is None:
        pytest.skip("no C compiler")
    assert cpu_kernels._build() is None
    assert "could not build broken.c" in "".join(capsys.readouterr())


def test_switched_off_by_environment(monkeypatch, capsys):
    monkeypatch.setenv("MOEMESH_CPU_KERNELS", "0")
    assert cpu_kernels._build() is None
    assert "MOEMESH_CPU_KERNELS=0" in "".join(capsys.readouterr())


@needs_kernel
def test_the_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEMESH_KERNEL_CACHE", str(tmp_path))
    lib = cpu_kernels._build()
    built = sorted(tmp_path.glob("cpu_gemv-*.so"))
    assert lib is not None and len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert cpu_kernels._build() is not None
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("cpu_gemv-*.so")] == [mtime]  # loaded, not rebuilt


@needs_kernel
def test_an_edit_to_the_other_source_or_the_header_builds_anew(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEMESH_KERNEL_CACHE", str(tmp_path / "cache"))
    assert cpu_kernels._build() is not None
    header = tmp_path / "cpu_simd.h"
    header.write_text(cpu_kernels.HEADERS[0].read_text() + "\n/* edited */\n")
    monkeypatch.setattr(cpu_kernels, "HEADERS", (header,))
    assert cpu_kernels._build() is not None
    assert len(list((tmp_path / "cache").glob("cpu_gemv-*.so"))) == 2


def test_an_unwritable_cache_falls_back(monkeypatch, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MOEMESH_KERNEL_CACHE", str(tmp_path / "a-file" / "cache"))  # under a file: no mkdir
    if cpu_kernels.find_compiler() is None:
        pytest.skip("no C compiler")
    assert cpu_kernels._build() is None
    assert "cannot write the cache" in "".join(capsys.readouterr())


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(13, 37), (5, 3), (6, 64)])
def test_a_rows_result_does_not_depend_on_its_batch(dtype, n, k):
    """Bit-equal whether a row goes alone, in a pair or among more (partial last weight blocks included)."""
    g = torch.Generator().manual_seed(n * 100 + k)
    x, w = torch.randn(17, k, generator=g), torch.randn(n, k, generator=g).to(dtype)
    alone = torch.cat([cpu_kernels.linear(x[i:i + 1], w) for i in range(17)])
    for m in (2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 17):  # pairs, tiles of 3 and 4 and their remainders
        assert torch.equal(cpu_kernels.linear(x[:m], w), alone[:m]), m
