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
 * The routed experts' layer and the dense SwiGLU over these products are kernels/cpu_moe.c; the rest of the
 * decode step (mla_decode, rmsnorm, rope) kernels/cpu_decode_ops.c, a whole MLA layer kernels/cpu_mla_layer.c,
 * FP8 experts' blocks kernels/cpu_fp8.c, all built into the same library.
 */
#include "cpu_simd.h"

#ifdef MM_AVX2
static inline vf load_w(const void *w, int wdtype, int64_t off) {
    if (wdtype == W_F32) return vload((const float *)w + off);
    return vwiden((const uint16_t *)w + off, wdtype == W_BF16);
}

/* Software prefetch of the next weight block while this one streams: the NB * VW * esz bytes a vector step
 * consumes here, at the same offset in the block after it (decode blocks are too short for the hardware
 * prefetchers to ramp up on: 1-2 KB per row). Into L2 (T1): perf shows the loop waiting on the prefetches
 * themselves when they target L1 (its fill buffers are full), and T1 measured 3-5% faster than T0. Always
 * inlined: merely inline, GCC 12 dropped its prefetches from rows_dot_t's loop (19 GB/s instead of 26 there). */
static inline __attribute__((always_inline)) void prefetch_step(const char *next, int64_t i, int64_t esz) {
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
        prefetch_step(next, i, esz);
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
    /* lane 4m + r of the sums: acc's order */
    const vf u[16] = {a00, a10, a20, a30, a01, a11, a21, a31, a02, a12, a22, a32, a03, a13, a23, a33};
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

int mm_abi_version(void) { return 9; }
