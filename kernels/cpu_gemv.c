/* Small-M matrix products over weights read once: the CPU expert path (kernels/cpu_kernels.py builds this).
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] with fp32 activations and accumulation, and weights kept in their
 * stored dtype (fp32, bf16 or fp16) and widened to fp32 in registers: bf16 -> fp32 is a 16-bit shift and
 * fp16 -> fp32 is exact too, so the products equal fp32 math on upcast weights up to summation order.
 *
 * Decode-sized batches (1-64 rows per expert) are bound by reading the weights, not by arithmetic: each
 * thread takes long runs of adjacent blocks of NB = 4 weight rows (grab: one sequential stream per
 * thread, dynamic so that a preempted thread holds the others up little), streaming each block once. Each
 * vector of weights is loaded and widened once and multiplied into every x row of a tile (up to 4): widening
 * a block once into scratch for many rows measured slower at every row count up to 64 (its store and reload
 * cost more than widening again; scripts/bench_cpu_experts.py, Xeon with AVX-512).
 *
 * moe_swiglu runs every busy expert of a layer in two parallel regions (gate/up with silu(g) * u fused,
 * then down), so one call per layer replaces a Python loop of small GEMMs; moe_forward adds the routing
 * bookkeeping around it, and swiglu is the dense MLP's (shared experts). The rest of the decode step
 * (mla_decode, rmsnorm, rope) is kernels/cpu_decode_ops.c, FP8 experts' blocks kernels/cpu_fp8.c, built into the
 * same library.
 */
#include "cpu_simd.h"

/* Work items per grab of a dynamic schedule over n items: a quarter of a thread's share (at least `least`).
 * Long runs of adjacent items keep each thread's reads one sequential stream, which the hardware prefetchers
 * follow across pages: the routed experts read 20-27% faster than in grabs of 8 blocks (scripts/
 * bench_cpu_experts.py, 2 threads, Xeon with AVX-512), as fast as a static split; dynamic still lets a thread
 * the OS preempts hold the others up by one grab at most. */
static inline int64_t grab(int64_t n, int nthreads, int64_t least) {
    const int64_t g = n / (4 * (int64_t)nthreads);
    return g > least ? g : least;
}

#ifdef MM_AVX2
static inline vf load_w(const void *w, int wdtype, int64_t off) {
    if (wdtype == W_F32) return vload((const float *)w + off);
    return vwiden((const uint16_t *)w + off, wdtype == W_BF16);
}

/* Software prefetch of the next weight block while this one streams: the NB * VW * esz bytes a vector step
 * consumes here, at the same offset in the block after it (decode blocks are too short for the hardware
 * prefetchers to ramp up on: 1-2 KB per row). Into L2 (T1): perf shows the loop waiting on the prefetches
 * themselves when they target L1 (its fill buffers are full), and T1 measured 3-5% faster than T0. */
static inline void prefetch_step(const char *next, int64_t i, int64_t esz) {
    const char *p = next + i * NB * esz;
    for (int64_t q = 0; q < NB * VW * esz; q += 64) _mm_prefetch(p + q, _MM_HINT_T1);
}
#endif

static inline int64_t elem_size(int wdtype) { return wdtype == W_F32 ? 4 : 2; }

static inline float w_at(const void *w, int wdtype, int64_t off) {
    if (wdtype == W_F32) return ((const float *)w)[off];
    uint16_t v = ((const uint16_t *)w)[off];
    return wdtype == W_BF16 ? bf16_to_f32(v) : f16_to_f32(v);
}

/* One x row against nb (<= NB) weight rows straight from memory (stored dtype): acc[r] = x . w[n0 + r]. */
static void row_dot_rows(const float *x, const void *w, int wdtype, int64_t n0, int nb, int64_t k, float *acc) {
    int64_t i = 0;
#ifdef MM_AVX2
    if (nb == NB) {
        vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
        const int64_t b0 = n0 * k, b1 = b0 + k, b2 = b1 + k, b3 = b2 + k, esz = elem_size(wdtype);
        const char *next = (const char *)w + (b0 + NB * k) * esz;
        for (; i + VW <= k; i += VW) {
            prefetch_step(next, i, esz);
            vf xv = vload(x + i);
            a0 = vfma(xv, load_w(w, wdtype, b0 + i), a0);
            a1 = vfma(xv, load_w(w, wdtype, b1 + i), a1);
            a2 = vfma(xv, load_w(w, wdtype, b2 + i), a2);
            a3 = vfma(xv, load_w(w, wdtype, b3 + i), a3);
        }
#ifdef MM_VSUM16
        const vf z = vzero(), u[16] = {a0, z, z, z, a1, z, z, z, a2, z, z, z, a3, z, z, z};
        _mm_storeu_ps(acc, _mm512_castps512_ps128(vsum16(u)));  /* lanes 0-3 */
#else
        acc[0] = vsum(a0); acc[1] = vsum(a1); acc[2] = vsum(a2); acc[3] = vsum(a3);
#endif
    } else {
        for (int r = 0; r < nb; r++) acc[r] = 0.f;
        i = 0;
        for (int r = 0; r < nb; r++) {
            vf a = vzero();
            int64_t j = 0;
            for (; j + VW <= k; j += VW) a = vfma(vload(x + j), load_w(w, wdtype, (n0 + r) * k + j), a);
            acc[r] = vsum(a);
            for (; j < k; j++) acc[r] += x[j] * w_at(w, wdtype, (n0 + r) * k + j);
        }
        return;
    }
#else
    for (int r = 0; r < nb; r++) acc[r] = 0.f;
#endif
    for (; i < k; i++) {
        for (int r = 0; r < nb; r++) acc[r] += x[i] * w_at(w, wdtype, (n0 + r) * k + i);
    }
}

/* Two x rows against nb (<= NB) weight rows starting at element `base` of w (stored dtype, row length k):
 * acc[m * NB + r]. */
static void rows2_dot(const float *x0, const float *x1, const void *w, int wdtype, int64_t base, int nb, int64_t k,
                      float *acc) {
    int64_t i = 0;
#ifdef MM_AVX2
    if (nb == NB) {
        vf a00 = vzero(), a01 = a00, a02 = a00, a03 = a00;
        vf a10 = a00, a11 = a00, a12 = a00, a13 = a00;
        const int64_t esz = elem_size(wdtype);
        const char *next = (const char *)w + (base + NB * k) * esz;
        for (; i + VW <= k; i += VW) {
            prefetch_step(next, i, esz);
            vf u = vload(x0 + i), v = vload(x1 + i);
            vf w0 = load_w(w, wdtype, base + i), w1 = load_w(w, wdtype, base + k + i);
            vf w2 = load_w(w, wdtype, base + 2 * k + i), w3 = load_w(w, wdtype, base + 3 * k + i);
            a00 = vfma(u, w0, a00); a01 = vfma(u, w1, a01); a02 = vfma(u, w2, a02); a03 = vfma(u, w3, a03);
            a10 = vfma(v, w0, a10); a11 = vfma(v, w1, a11); a12 = vfma(v, w2, a12); a13 = vfma(v, w3, a13);
        }
#ifdef MM_VSUM16
        const vf z = vzero(), u[16] = {a00, a10, z, z, a01, a11, z, z, a02, a12, z, z, a03, a13, z, z};
        _mm256_storeu_ps(acc, _mm512_castps512_ps256(vsum16(u)));  /* lanes 0-7: acc[m * NB + r] */
#else
        acc[0] = vsum(a00); acc[1] = vsum(a01); acc[2] = vsum(a02); acc[3] = vsum(a03);
        acc[NB] = vsum(a10); acc[NB + 1] = vsum(a11); acc[NB + 2] = vsum(a12); acc[NB + 3] = vsum(a13);
#endif
        for (; i < k; i++) {
            for (int r = 0; r < NB; r++) {
                const float wv = w_at(w, wdtype, base + r * k + i);
                acc[r] += x0[i] * wv;
                acc[NB + r] += x1[i] * wv;
            }
        }
        return;
    }
    /* A partial last block: each row summed as row_dot_rows sums it (vector lanes, then the tail), so a row's
     * result does not depend on how many rows share its batch. */
    row_dot_rows(x0, w, wdtype, base / k, nb, k, acc);
    row_dot_rows(x1, w, wdtype, base / k, nb, k, acc + NB);
    return;
#endif
    for (int r = 0; r < 2 * NB; r++) acc[r] = 0.f;
    for (int r = 0; r < nb; r++) {
        for (i = 0; i < k; i++) {
            const float wv = w_at(w, wdtype, base + r * k + i);
            acc[r] += x0[i] * wv;
            acc[NB + r] += x1[i] * wv;
        }
    }
}

/* R (3 or 4) x rows against a full block of NB weight rows at element `base` of w (stored dtype, row length k):
 * acc[m * NB + r]. Each weight vector is loaded (and widened) once per step and used by every row: 4R
 * accumulators, 4 + R loads per 4R FMAs (rows2_dot: 6 per 8), the reuse that 3 or more rows per weight need.
 * Each row is summed exactly as row_dot_rows sums it (vector lanes over k, then the tail), so its result does
 * not depend on its batch. Inlined with R constant: the tile stays in registers. */
static inline __attribute__((always_inline)) void rows_dot_t(const float *x, int64_t ldx, const int R, const void *w,
                                                             const int wdtype, int64_t base, int64_t k, float *acc) {
    int64_t i = 0;
#ifdef MM_AVX2
    /* 16 named accumulators, not an array: GCC keeps these in registers (an array of them it spilled) */
    vf a00 = vzero(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    vf a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + (R > 3 ? 3 : 2) * ldx;
    const int64_t esz = elem_size(wdtype);
    const char *next = (const char *)w + (base + NB * k) * esz;
    for (; i + VW <= k; i += VW) {
        for (int64_t q = 0; q < NB * VW * esz; q += 64) _mm_prefetch(next + i * NB * esz + q, _MM_HINT_T1);  /* prefetch_step's, written out: GCC dropped it here */
        const vf w0 = load_w(w, wdtype, base + i), w1 = load_w(w, wdtype, base + k + i);
        const vf w2 = load_w(w, wdtype, base + 2 * k + i), w3 = load_w(w, wdtype, base + 3 * k + i);
        vf u = vload(x0 + i);
        a00 = vfma(u, w0, a00); a01 = vfma(u, w1, a01); a02 = vfma(u, w2, a02); a03 = vfma(u, w3, a03);
        u = vload(x1 + i);
        a10 = vfma(u, w0, a10); a11 = vfma(u, w1, a11); a12 = vfma(u, w2, a12); a13 = vfma(u, w3, a13);
        u = vload(x2 + i);
        a20 = vfma(u, w0, a20); a21 = vfma(u, w1, a21); a22 = vfma(u, w2, a22); a23 = vfma(u, w3, a23);
        if (R > 3) {
            u = vload(x3 + i);
            a30 = vfma(u, w0, a30); a31 = vfma(u, w1, a31); a32 = vfma(u, w2, a32); a33 = vfma(u, w3, a33);
        }
    }
#ifdef MM_VSUM16
    const vf u[16] = {a00, a10, a20, a30, a01, a11, a21, a31, a02, a12, a22, a32, a03, a13, a23, a33};  /* lane 4m + r */
    float sums[4 * NB];
    vstore(sums, vsum16(u));
    for (int q = 0; q < R * NB; q++) acc[q] = sums[q];
#else
    const vf t[4][NB] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
    for (int m = 0; m < R; m++)
        for (int r = 0; r < NB; r++) acc[m * NB + r] = vsum(t[m][r]);
#endif
#else
    for (int q = 0; q < R * NB; q++) acc[q] = 0.f;
#endif
    for (; i < k; i++) {
        for (int r = 0; r < NB; r++) {
            const float wv = w_at(w, wdtype, base + r * k + i);
            for (int m = 0; m < R; m++) acc[m * NB + r] += x[m * ldx + i] * wv;
        }
    }
}

/* rows_dot_t for each (R, weight dtype): the dtype a constant too, so no load branches on it. */
static void rows_dot(const float *x, int64_t ldx, int R, const void *w, int wdtype, int64_t base, int64_t k,
                     float *acc) {
    if (R == 4) {
        if (wdtype == W_F32) rows_dot_t(x, ldx, 4, w, W_F32, base, k, acc);
        else if (wdtype == W_BF16) rows_dot_t(x, ldx, 4, w, W_BF16, base, k, acc);
        else rows_dot_t(x, ldx, 4, w, W_F16, base, k, acc);
    } else {
        if (wdtype == W_F32) rows_dot_t(x, ldx, 3, w, W_F32, base, k, acc);
        else if (wdtype == W_BF16) rows_dot_t(x, ldx, 3, w, W_BF16, base, k, acc);
        else rows_dot_t(x, ldx, 3, w, W_F16, base, k, acc);
    }
}

/* Rows [n0, n0 + nb) of y for m x rows: out[mi * ldo + (n - n0)] (the caller places the columns). */
void cpu_block_product(const float *x, int64_t ldx, int64_t m, const void *w, int wdtype, int64_t n0, int nb,
                       int64_t k, float *out, int64_t ldo) {
    float acc[4 * NB];
    if (m == 1) {
        row_dot_rows(x, w, wdtype, n0, nb, k, acc);
        for (int r = 0; r < nb; r++) out[r] = acc[r];
        return;
    }
    int64_t mi = 0;
    if (nb == NB) {  /* full blocks: four rows at a time while they last, then three */
        for (; mi + 4 <= m; mi += 4) {
            rows_dot(x + mi * ldx, ldx, 4, w, wdtype, n0 * k, k, acc);
            for (int q = 0; q < 4; q++)
                for (int r = 0; r < NB; r++) out[(mi + q) * ldo + r] = acc[q * NB + r];
        }
        if (m - mi == 3) {
            rows_dot(x + mi * ldx, ldx, 3, w, wdtype, n0 * k, k, acc);
            for (int q = 0; q < 3; q++)
                for (int r = 0; r < NB; r++) out[(mi + q) * ldo + r] = acc[q * NB + r];
            mi += 3;
        }
    }
    for (; mi + 2 <= m; mi += 2) {
        rows2_dot(x + mi * ldx, x + (mi + 1) * ldx, w, wdtype, n0 * k, nb, k, acc);
        for (int r = 0; r < nb; r++) {
            out[mi * ldo + r] = acc[r];
            out[(mi + 1) * ldo + r] = acc[NB + r];
        }
    }
    if (mi < m) {
        row_dot_rows(x + mi * ldx, w, wdtype, n0, nb, k, acc);
        for (int r = 0; r < nb; r++) out[mi * ldo + r] = acc[r];
    }
}

/* cpu_block_product over an expert matrix in any weight dtype (FP8: kernels/cpu_fp8.c). */
static void expert_block(const float *x, int64_t ldx, int64_t m, const void *w, int wdtype, const float *scale,
                         const fp8_scales *q, int64_t n0, int nb, int64_t k, float *scratch, float *out, int64_t ldo) {
    if (wdtype == W_E4M3)
        cpu_fp8_block_product(x, ldx, m, (const uint8_t *)w, scale, q, n0, nb, k, scratch, out, ldo);
    else
        cpu_block_product(x, ldx, m, w, wdtype, n0, nb, k, out, ldo);
}

/* Rows of x per pass over a run of weight blocks: a tile of x stays in L1/L2 while the run (in L2) is reused
 * for every tile. Tiling never changes a row's summation order, so any batch size gives each row the bits it
 * gets alone: the CPU linear runs this for every batch (kernels/cpu_paths.py), prefill included. */
#define TM 64
#define RUN 8 /* weight blocks per task: 32 rows, 64 KB of fp32 at K = 512 */

/* y [m, n] (row stride n) = x [m, k] (row stride ldx) @ w[n, k]^T. */
void mm_linear(const float *x, int64_t ldx, int64_t m, const void *w, int wdtype, int64_t n, int64_t k, float *y,
               int nthreads) {
    const int64_t blocks = (n + NB - 1) / NB, runs = (blocks + RUN - 1) / RUN;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(dynamic, grab(runs, nthreads, 1))
        for (int64_t run = 0; run < runs; run++) {
            const int64_t b_end = (run + 1) * RUN < blocks ? (run + 1) * RUN : blocks;
            for (int64_t r0 = 0; r0 < m; r0 += TM) {
                const int64_t mt = m - r0 < TM ? m - r0 : TM;
                for (int64_t b = run * RUN; b < b_end; b++) {
                    const int64_t n0 = b * NB;
                    const int nb = (int)(n - n0 < NB ? n - n0 : NB);
                    cpu_block_product(x + r0 * ldx, ldx, mt, w, wdtype, n0, nb, k, y + r0 * n + n0, n);
                }
            }
        }
    }
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* Routed experts of one layer, rows sorted by expert: xs [A, d]; rows offs[s]..offs[s+1] go to slot s
 * (n_slots slots, offs has n_slots + 1 entries). w13 [n_slots, 2I, d] = [gate; up], w2 [n_slots, d, I].
 * h [A, I] is scratch; ys [A, d] receives w2 @ (silu(gate x) * up x) per row. */
static void moe_swiglu(const float *xs, const int64_t *offs, int64_t n_slots, const void *w13, const void *w2,
                       int wdtype, const fp8_scales *q, int64_t d, int64_t inter, float *h, float *ys, int nthreads) {
    const int64_t esz = wdtype == W_F32 ? 4 : wdtype == W_E4M3 ? 1 : 2;
    /* FP8: the scale grid of each expert's w13 [2I, d] and w2 [d, I] (one matrix each, as the reference reads them) */
    const int64_t g13 = q ? ((2 * inter + q->bn - 1) / q->bn) * ((d + q->bk - 1) / q->bk) : 0;
    const int64_t g2 = q ? ((d + q->bn - 1) / q->bn) * ((inter + q->bk - 1) / q->bk) : 0;
    int64_t *busy = (int64_t *)malloc(sizeof(int64_t) * (n_slots > 0 ? n_slots : 1)), nbusy = 0;
    for (int64_t s = 0; s < n_slots; s++)
        if (offs[s + 1] > offs[s]) busy[nbusy++] = s;
    const int64_t gblocks = (inter + NB - 1) / NB, dblocks = (d + NB - 1) / NB;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t kmax = d > inter ? d : inter;
        float *scratch = wdtype == W_E4M3 ? (float *)malloc(sizeof(float) * NB * kmax) : NULL;  /* FP8's dequant */
        float *gu = (float *)malloc(sizeof(float) * 2 * NB * (offs[n_slots] - offs[0] + 1));
#pragma omp for schedule(dynamic, grab(nbusy * gblocks, nthreads, 8))
        for (int64_t j = 0; j < nbusy * gblocks; j++) {
            const int64_t s = busy[j / gblocks], i0 = (j % gblocks) * NB, r0 = offs[s], m = offs[s + 1] - r0;
            const int nb = (int)(inter - i0 < NB ? inter - i0 : NB);
            const char *we = (const char *)w13 + s * 2 * inter * d * esz;
            const float *se = q ? q->s13 + s * g13 : NULL;
            expert_block(xs + r0 * d, d, m, we, wdtype, se, q, i0, nb, d, scratch, gu, 2 * NB);
            expert_block(xs + r0 * d, d, m, we, wdtype, se, q, inter + i0, nb, d, scratch, gu + NB, 2 * NB);
            for (int64_t mi = 0; mi < m; mi++)
                for (int r = 0; r < nb; r++)
                    h[(r0 + mi) * inter + i0 + r] = silu(gu[mi * 2 * NB + r]) * gu[mi * 2 * NB + NB + r];
        }
#pragma omp for schedule(dynamic, grab(nbusy * dblocks, nthreads, 8))
        for (int64_t j = 0; j < nbusy * dblocks; j++) {
            const int64_t s = busy[j / dblocks], n0 = (j % dblocks) * NB, r0 = offs[s], m = offs[s + 1] - r0;
            const int nb = (int)(d - n0 < NB ? d - n0 : NB);
            const char *we = (const char *)w2 + s * d * inter * esz;
            expert_block(h + r0 * inter, inter, m, we, wdtype, q ? q->s2 + s * g2 : NULL, q, n0, nb, inter, scratch,
                         ys + r0 * d + n0, d);
        }
        free(gu);
        free(scratch);
    }
    free(busy);
}

void mm_moe_swiglu(const float *xs, const int64_t *offs, int64_t n_slots, const void *w13, const void *w2,
                   int wdtype, int64_t d, int64_t inter, float *h, float *ys, int nthreads) {
    moe_swiglu(xs, offs, n_slots, w13, w2, wdtype, NULL, d, inter, h, ys, nthreads);
}

/* Dense SwiGLU (shared experts, dense MLP layers): y [m, d] = w2 @ (silu(w1 x) * (w3 x)), w1 and w3 [inter, d],
 * w2 [d, inter], in one call (two parallel regions) instead of three linears and two elementwise ops.
 * h [m, inter] is scratch. */
void mm_swiglu(const float *x, int64_t ldx, int64_t m, const void *w1, const void *w3, const void *w2, int wdtype,
               int64_t d, int64_t inter, float *h, float *y, int nthreads) {
    const int64_t gblocks = (inter + NB - 1) / NB, dblocks = (d + NB - 1) / NB;
#pragma omp parallel num_threads(nthreads)
    {
        float *gu = (float *)malloc(sizeof(float) * 2 * NB * (m + 1));
#pragma omp for schedule(dynamic, grab(gblocks, nthreads, 8))
        for (int64_t j = 0; j < gblocks; j++) {
            const int64_t i0 = j * NB;
            const int nb = (int)(inter - i0 < NB ? inter - i0 : NB);
            cpu_block_product(x, ldx, m, w1, wdtype, i0, nb, d, gu, 2 * NB);
            cpu_block_product(x, ldx, m, w3, wdtype, i0, nb, d, gu + NB, 2 * NB);
            for (int64_t mi = 0; mi < m; mi++)
                for (int r = 0; r < nb; r++)
                    h[mi * inter + i0 + r] = silu(gu[mi * 2 * NB + r]) * gu[mi * 2 * NB + NB + r];
        }
#pragma omp for schedule(dynamic, grab(dblocks, nthreads, 8))
        for (int64_t j = 0; j < dblocks; j++) {
            const int64_t n0 = j * NB;
            const int nb = (int)(d - n0 < NB ? d - n0 : NB);
            cpu_block_product(h, inter, m, w2, wdtype, n0, nb, inter, y + n0, d);
        }
        free(gu);
    }
}

/* A whole routed-expert layer on one shard, routing bookkeeping included: x [t, d] (row stride ldx); topk_idx
 * [t, top_k] logical expert ids (-1 or any id without a slot here: computed elsewhere, skipped); topk_w [t, top_k]
 * fp32 gate weights; slot_of [n_experts] local slot of each logical id or -1. out [t, d] receives, per row,
 * sum over its hosted assignments in k order of w * expert(x): a row's result never depends on the other rows.
 * Replaces ~25 small torch ops per layer (slot lookup, sort, gather, offsets, weighting, index_add). */
static void moe_forward(const float *x, int64_t ldx, int64_t t, const int64_t *topk_idx, const float *topk_w,
                        int64_t top_k, const int64_t *slot_of, int64_t n_experts, int64_t n_slots, const void *w13,
                        const void *w2, int wdtype, const fp8_scales *q, int64_t d, int64_t inter, float *out,
                        int nthreads) {
    const int64_t n = t * top_k;
    int64_t *slot = (int64_t *)malloc(sizeof(int64_t) * (n > 0 ? n : 1));
    int64_t *offs = (int64_t *)calloc((size_t)n_slots + 2, sizeof(int64_t));
    int64_t *pos = (int64_t *)malloc(sizeof(int64_t) * (n > 0 ? n : 1));  /* row of xs of each assignment */
    for (int64_t a = 0; a < n; a++) {
        const int64_t e = topk_idx[a];
        slot[a] = e >= 0 && e < n_experts ? slot_of[e] : -1;
        if (slot[a] >= n_slots) slot[a] = -1;
        if (slot[a] >= 0) offs[slot[a] + 1]++;
    }
    for (int64_t s = 0; s < n_slots; s++) offs[s + 1] += offs[s];
    const int64_t total = offs[n_slots];
    float *xs = (float *)malloc(sizeof(float) * d * (total > 0 ? total : 1));
    float *ys = (float *)malloc(sizeof(float) * d * (total > 0 ? total : 1));
    float *h = (float *)malloc(sizeof(float) * inter * (total > 0 ? total : 1));
    int64_t *fill = (int64_t *)malloc(sizeof(int64_t) * (n_slots > 0 ? n_slots : 1));
    memcpy(fill, offs, sizeof(int64_t) * (n_slots > 0 ? n_slots : 1));
    for (int64_t a = 0; a < n; a++) {  /* counting sort by slot, stable: rows in order within an expert */
        if (slot[a] < 0) continue;
        pos[a] = fill[slot[a]]++;
        memcpy(xs + pos[a] * d, x + (a / top_k) * ldx, sizeof(float) * d);
    }
    if (total > 0) moe_swiglu(xs, offs, n_slots, w13, w2, wdtype, q, d, inter, h, ys, nthreads);
    /* Each row's sum runs in ascending slot order (stable), as the shard's torch path adds its sorted assignments
       with index_add_: then a row's bits do not depend on which side of the row limit its batch fell. */
    int64_t *by_slot = (int64_t *)malloc(sizeof(int64_t) * (top_k > 0 ? top_k : 1));
    for (int64_t r = 0; r < t; r++) {
        float *o = out + r * d;
        memset(o, 0, sizeof(float) * d);
        int64_t m = 0;
        for (int64_t k = 0; k < top_k; k++) {  /* insertion sort of the row's hosted assignments by slot */
            const int64_t a = r * top_k + k;
            if (slot[a] < 0) continue;
            int64_t j = m++;
            while (j > 0 && slot[by_slot[j - 1]] > slot[a]) { by_slot[j] = by_slot[j - 1]; j--; }
            by_slot[j] = a;
        }
        for (int64_t q = 0; q < m; q++) {
            const int64_t a = by_slot[q];
            const float wk = topk_w[a], *yr = ys + pos[a] * d;
            for (int64_t i = 0; i < d; i++) o[i] += wk * yr[i];
        }
    }
    free(by_slot);
    free(fill); free(h); free(ys); free(xs); free(pos); free(offs); free(slot);
}

void mm_moe_forward(const float *x, int64_t ldx, int64_t t, const int64_t *topk_idx, const float *topk_w,
                    int64_t top_k, const int64_t *slot_of, int64_t n_experts, int64_t n_slots, const void *w13,
                    const void *w2, int wdtype, int64_t d, int64_t inter, float *out, int nthreads) {
    moe_forward(x, ldx, t, topk_idx, topk_w, top_k, slot_of, n_experts, n_slots, w13, w2, wdtype, NULL, d, inter, out,
                nthreads);
}

/* mm_moe_forward over FP8 (e4m3fn) experts with their fp32 block scales s13, s2 (fp8_scales' shapes), blocks
 * of bn x bk: each block of weights is dequantized into L1 as it streams (1 byte read per weight). */
void mm_moe_forward_fp8(const float *x, int64_t ldx, int64_t t, const int64_t *topk_idx, const float *topk_w,
                        int64_t top_k, const int64_t *slot_of, int64_t n_experts, int64_t n_slots, const uint8_t *w13,
                        const float *s13, const uint8_t *w2, const float *s2, int64_t bn, int64_t bk, int64_t d,
                        int64_t inter, float *out, int nthreads) {
    const fp8_scales q = {s13, s2, bn, bk};
    moe_forward(x, ldx, t, topk_idx, topk_w, top_k, slot_of, n_experts, n_slots, w13, w2, W_E4M3, &q, d, inter, out,
                nthreads);
}

int mm_abi_version(void) { return 7; }
