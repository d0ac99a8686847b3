/* Small-M matrix products over weights read once: the CPU expert path (kernels/cpu_kernels.py builds this).
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] with fp32 activations and accumulation, and weights kept in their
 * stored dtype (fp32, bf16 or fp16) and widened to fp32 in registers: bf16 -> fp32 is a 16-bit shift and
 * fp16 -> fp32 is exact too, so the products equal fp32 math on upcast weights up to summation order.
 *
 * Decode-sized batches (1-64 rows per expert) are bound by reading the weights, not by arithmetic: each
 * thread takes runs of 8 blocks of NB = 4 weight rows (dynamic: a thread the OS preempts does not hold
 * the others up), streaming each block once; when more than two x rows
 * reuse the block it is widened once into a per-thread fp32 scratch that stays in L1/L2.
 *
 * moe_swiglu runs every busy expert of a layer in two parallel regions (gate/up with silu(g) * u fused,
 * then down), so one call per layer replaces a Python loop of small GEMMs; moe_forward adds the routing
 * bookkeeping around it. The rest of the decode step (swiglu, mla_decode, rmsnorm, rope) is fused here
 * too: there every torch op costs more than the bytes it reads (see kernels/README.md).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
/* Vectors: AVX-512 (16 floats) where the compiler targets it (-march=native on such a CPU), else AVX2+FMA+F16C
 * (8 floats), else scalar C: one code path over these few operations. */
#if defined(__AVX512F__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MM_AVX2 1
#define VW 16
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vsum(v) _mm512_reduce_add_ps(v)
#define vset1(a) _mm512_set1_ps(a)
static inline vf vwiden(const uint16_t *s, int bf16) {
    __m256i h = _mm256_loadu_si256((const __m256i *)s);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MM_AVX2 1
#define VW 8
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vset1(a) _mm256_set1_ps(a)
static inline float vsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vf vwiden(const uint16_t *s, int bf16) {
    __m128i h = _mm_loadu_si128((const __m128i *)s);
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}
#endif

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2 };
#define NB 4

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else {  /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        u = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Widen rows [n0, n0 + nb) of w (row length k) into dst (fp32, nb * k). */
static void widen_rows(const void *w, int wdtype, int64_t n0, int nb, int64_t k, float *dst) {
    for (int r = 0; r < nb; r++) {
        float *d = dst + r * k;
        if (wdtype == W_F32) {
            memcpy(d, (const float *)w + (n0 + r) * k, k * sizeof(float));
            continue;
        }
        const uint16_t *s = (const uint16_t *)w + (n0 + r) * k;
        int64_t i = 0;
#ifdef MM_AVX2
        for (; i + VW <= k; i += VW) vstore(d + i, vwiden(s + i, wdtype == W_BF16));
#endif
        for (; i < k; i++) d[i] = wdtype == W_BF16 ? bf16_to_f32(s[i]) : f16_to_f32(s[i]);
    }
}

#ifdef MM_AVX2
static inline vf load_w(const void *w, int wdtype, int64_t off) {
    if (wdtype == W_F32) return vload((const float *)w + off);
    return vwiden((const uint16_t *)w + off, wdtype == W_BF16);
}

/* Software prefetch of the next weight block while this one streams: the NB * VW * esz bytes a vector step
 * consumes here, at the same offset in the block after it (decode blocks are too short for the hardware
 * prefetchers to ramp up on: 1-2 KB per row). */
static inline void prefetch_step(const char *next, int64_t i, int64_t esz) {
    const char *p = next + i * NB * esz;
    for (int64_t q = 0; q < NB * VW * esz; q += 64) _mm_prefetch(p + q, _MM_HINT_T0);
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
        acc[0] = vsum(a0); acc[1] = vsum(a1); acc[2] = vsum(a2); acc[3] = vsum(a3);
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
 * acc[m * NB + r]. Widening on the fly here costs what widening into scratch would for one pair of rows. */
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
        acc[0] = vsum(a00); acc[1] = vsum(a01); acc[2] = vsum(a02); acc[3] = vsum(a03);
        acc[NB] = vsum(a10); acc[NB + 1] = vsum(a11); acc[NB + 2] = vsum(a12); acc[NB + 3] = vsum(a13);
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

/* Four x rows against a full block of NB weight rows at element `base` of fp32 w (row length k): acc[m * NB + r].
 * 16 accumulators, 8 loads per 16 FMAs (rows2_dot: 6 per 8), the reuse that 3-16 rows per weight need. Each
 * row is summed exactly as row_dot_rows sums it (vector lanes over k, then the tail), so its result does not
 * depend on its batch. */
static void rows4_dot_f32(const float *x, int64_t ldx, const float *w, int64_t base, int64_t k, float *acc) {
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    int64_t i = 0;
#ifdef MM_AVX2
    vf a[4][NB];
    for (int m = 0; m < 4; m++)
        for (int r = 0; r < NB; r++) a[m][r] = vzero();
    const char *next = (const char *)(w + base + NB * k);
    for (; i + VW <= k; i += VW) {
        prefetch_step(next, i, 4);
        vf w0 = vload(w + base + i), w1 = vload(w + base + k + i);
        vf w2 = vload(w + base + 2 * k + i), w3 = vload(w + base + 3 * k + i);
        vf u;
        u = vload(x0 + i); a[0][0] = vfma(u, w0, a[0][0]); a[0][1] = vfma(u, w1, a[0][1]);
        a[0][2] = vfma(u, w2, a[0][2]); a[0][3] = vfma(u, w3, a[0][3]);
        u = vload(x1 + i); a[1][0] = vfma(u, w0, a[1][0]); a[1][1] = vfma(u, w1, a[1][1]);
        a[1][2] = vfma(u, w2, a[1][2]); a[1][3] = vfma(u, w3, a[1][3]);
        u = vload(x2 + i); a[2][0] = vfma(u, w0, a[2][0]); a[2][1] = vfma(u, w1, a[2][1]);
        a[2][2] = vfma(u, w2, a[2][2]); a[2][3] = vfma(u, w3, a[2][3]);
        u = vload(x3 + i); a[3][0] = vfma(u, w0, a[3][0]); a[3][1] = vfma(u, w1, a[3][1]);
        a[3][2] = vfma(u, w2, a[3][2]); a[3][3] = vfma(u, w3, a[3][3]);
    }
    for (int m = 0; m < 4; m++)
        for (int r = 0; r < NB; r++) acc[m * NB + r] = vsum(a[m][r]);
#else
    for (int r = 0; r < 4 * NB; r++) acc[r] = 0.f;
#endif
    for (; i < k; i++) {
        for (int r = 0; r < NB; r++) {
            const float wv = w[base + r * k + i];
            acc[r] += x0[i] * wv;
            acc[NB + r] += x1[i] * wv;
            acc[2 * NB + r] += x2[i] * wv;
            acc[3 * NB + r] += x3[i] * wv;
        }
    }
}

/* Rows [n0, n0 + nb) of y for m x rows: out[mi * ldo + (n - n0)] (the caller places the columns). */
static void block_product(const float *x, int64_t ldx, int64_t m, const void *w, int wdtype, int64_t n0, int nb,
                          int64_t k, float *scratch, float *out, int64_t ldo) {
    float acc[4 * NB];
    if (m == 1) {
        row_dot_rows(x, w, wdtype, n0, nb, k, acc);
        for (int r = 0; r < nb; r++) out[r] = acc[r];
        return;
    }
    /* One pair of rows: read the weights in their stored dtype. More: widen the block once into scratch
     * (fp32 weights are read in place) and reuse it, from L1, for every pair. */
    const void *wb = w;
    int wt = wdtype;
    int64_t base = n0 * k;
    if (m > 2 && wdtype != W_F32) {
        widen_rows(w, wdtype, n0, nb, k, scratch);
        wb = scratch, wt = W_F32, base = 0;
    }
    int64_t mi = 0;
    if (nb == NB && wt == W_F32) {  /* full blocks: four rows at a time while they last */
        for (; mi + 4 <= m; mi += 4) {
            rows4_dot_f32(x + mi * ldx, ldx, (const float *)wb, base, k, acc);
            for (int q = 0; q < 4; q++)
                for (int r = 0; r < NB; r++) out[(mi + q) * ldo + r] = acc[q * NB + r];
        }
    }
    for (; mi + 2 <= m; mi += 2) {
        rows2_dot(x + mi * ldx, x + (mi + 1) * ldx, wb, wt, base, nb, k, acc);
        for (int r = 0; r < nb; r++) {
            out[mi * ldo + r] = acc[r];
            out[(mi + 1) * ldo + r] = acc[NB + r];
        }
    }
    if (mi < m) {
        row_dot_rows(x + mi * ldx, wb, wt, base / k, nb, k, acc);
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
        float *scratch = wdtype == W_F32 ? NULL : (float *)malloc(sizeof(float) * NB * k);
#pragma omp for schedule(dynamic, 1)
        for (int64_t run = 0; run < runs; run++) {
            const int64_t b_end = (run + 1) * RUN < blocks ? (run + 1) * RUN : blocks;
            for (int64_t r0 = 0; r0 < m; r0 += TM) {
                const int64_t mt = m - r0 < TM ? m - r0 : TM;
                for (int64_t b = run * RUN; b < b_end; b++) {
                    const int64_t n0 = b * NB;
                    const int nb = (int)(n - n0 < NB ? n - n0 : NB);
                    block_product(x + r0 * ldx, ldx, mt, w, wdtype, n0, nb, k, scratch, y + r0 * n + n0, n);
                }
            }
        }
        free(scratch);
    }
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* Routed experts of one layer, rows sorted by expert: xs [A, d]; rows offs[s]..offs[s+1] go to slot s
 * (n_slots slots, offs has n_slots + 1 entries). w13 [n_slots, 2I, d] = [gate; up], w2 [n_slots, d, I].
 * h [A, I] is scratch; ys [A, d] receives w2 @ (silu(gate x) * up x) per row. */
void mm_moe_swiglu(const float *xs, const int64_t *offs, int64_t n_slots, const void *w13, const void *w2,
                   int wdtype, int64_t d, int64_t inter, float *h, float *ys, int nthreads) {
    const int64_t esz = wdtype == W_F32 ? 4 : 2;
    int64_t *busy = (int64_t *)malloc(sizeof(int64_t) * (n_slots > 0 ? n_slots : 1)), nbusy = 0;
    for (int64_t s = 0; s < n_slots; s++)
        if (offs[s + 1] > offs[s]) busy[nbusy++] = s;
    const int64_t gblocks = (inter + NB - 1) / NB, dblocks = (d + NB - 1) / NB;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t kmax = d > inter ? d : inter;
        float *scratch = wdtype == W_F32 ? NULL : (float *)malloc(sizeof(float) * NB * kmax);
        float *gu = (float *)malloc(sizeof(float) * 2 * NB * (offs[n_slots] - offs[0] + 1));
#pragma omp for schedule(dynamic, 8)
        for (int64_t j = 0; j < nbusy * gblocks; j++) {
            const int64_t s = busy[j / gblocks], i0 = (j % gblocks) * NB, r0 = offs[s], m = offs[s + 1] - r0;
            const int nb = (int)(inter - i0 < NB ? inter - i0 : NB);
            const char *we = (const char *)w13 + s * 2 * inter * d * esz;
            block_product(xs + r0 * d, d, m, we, wdtype, i0, nb, d, scratch, gu, 2 * NB);
            block_product(xs + r0 * d, d, m, we, wdtype, inter + i0, nb, d, scratch, gu + NB, 2 * NB);
            for (int64_t mi = 0; mi < m; mi++)
                for (int r = 0; r < nb; r++)
                    h[(r0 + mi) * inter + i0 + r] = silu(gu[mi * 2 * NB + r]) * gu[mi * 2 * NB + NB + r];
        }
#pragma omp for schedule(dynamic, 8)
        for (int64_t j = 0; j < nbusy * dblocks; j++) {
            const int64_t s = busy[j / dblocks], n0 = (j % dblocks) * NB, r0 = offs[s], m = offs[s + 1] - r0;
            const int nb = (int)(d - n0 < NB ? d - n0 : NB);
            const char *we = (const char *)w2 + s * d * inter * esz;
            block_product(h + r0 * inter, inter, m, we, wdtype, n0, nb, inter, scratch, ys + r0 * d + n0, d);
        }
        free(gu);
        free(scratch);
    }
    free(busy);
}

/* Dense SwiGLU (shared experts, dense MLP layers): y [m, d] = w2 @ (silu(w1 x) * (w3 x)), w1 and w3 [inter, d],
 * w2 [d, inter], in one call (two parallel regions) instead of three linears and two elementwise ops.
 * h [m, inter] is scratch. */
void mm_swiglu(const float *x, int64_t ldx, int64_t m, const void *w1, const void *w3, const void *w2, int wdtype,
               int64_t d, int64_t inter, float *h, float *y, int nthreads) {
    const int64_t gblocks = (inter + NB - 1) / NB, dblocks = (d + NB - 1) / NB;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t kmax = d > inter ? d : inter;
        float *scratch = wdtype == W_F32 ? NULL : (float *)malloc(sizeof(float) * NB * kmax);
        float *gu = (float *)malloc(sizeof(float) * 2 * NB * (m + 1));
#pragma omp for schedule(dynamic, 8)
        for (int64_t j = 0; j < gblocks; j++) {
            const int64_t i0 = j * NB;
            const int nb = (int)(inter - i0 < NB ? inter - i0 : NB);
            block_product(x, ldx, m, w1, wdtype, i0, nb, d, scratch, gu, 2 * NB);
            block_product(x, ldx, m, w3, wdtype, i0, nb, d, scratch, gu + NB, 2 * NB);
            for (int64_t mi = 0; mi < m; mi++)
                for (int r = 0; r < nb; r++)
                    h[mi * inter + i0 + r] = silu(gu[mi * 2 * NB + r]) * gu[mi * 2 * NB + NB + r];
        }
#pragma omp for schedule(dynamic, 8)
        for (int64_t j = 0; j < dblocks; j++) {
            const int64_t n0 = j * NB;
            const int nb = (int)(d - n0 < NB ? d - n0 : NB);
            block_product(h, inter, m, w2, wdtype, n0, nb, inter, scratch, y + n0, d);
        }
        free(gu);
        free(scratch);
    }
}

/* A whole routed-expert layer on one shard, routing bookkeeping included: x [t, d] (row stride ldx); topk_idx
 * [t, top_k] logical expert ids (-1 or any id without a slot here: computed elsewhere, skipped); topk_w [t, top_k]
 * fp32 gate weights; slot_of [n_experts] local slot of each logical id or -1. out [t, d] receives, per row,
 * sum over its hosted assignments in k order of w * expert(x): a row's result never depends on the other rows.
 * Replaces ~25 small torch ops per layer (slot lookup, sort, gather, offsets, weighting, index_add). */
void mm_moe_forward(const float *x, int64_t ldx, int64_t t, const int64_t *topk_idx, const float *topk_w,
                    int64_t top_k, const int64_t *slot_of, int64_t n_experts, int64_t n_slots, const void *w13,
                    const void *w2, int wdtype, int64_t d, int64_t inter, float *out, int nthreads) {
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
    if (total > 0) mm_moe_swiglu(xs, offs, n_slots, w13, w2, wdtype, d, inter, h, ys, nthreads);
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

/* RMSNorm over rows: y = w * (x * 1 / sqrt(mean(x^2) + eps)), fp32, as attn_node/model.py's RMSNorm computes it
 * in one call instead of seven ops. Single-threaded: decode-sized rows are microseconds of work. */
void mm_rmsnorm(const float *x, int64_t ldx, int64_t m, int64_t d, const float *w, float eps, float *y, int64_t ldy) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * ldx;
        float *yr = y + r * ldy;
        float ss = 0.f;
        int64_t i = 0;
#ifdef MM_AVX2
        vf acc = vzero();
        for (; i + VW <= d; i += VW) { vf v = vload(xr + i); acc = vfma(v, v, acc); }
        ss = vsum(acc);
#endif
        for (; i < d; i++) ss += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(ss / (float)d + eps);
        for (i = 0; i < d; i++) yr[i] = w[i] * (xr[i] * inv);
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float s = 0.f;
    int64_t i = 0;
#ifdef MM_AVX2
    vf acc = vzero();
    for (; i + VW <= n; i += VW) acc = vfma(vload(a + i), vload(b + i), acc);
    s = vsum(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* o[j] = q . r_j for four rows at once: four independent accumulators (one would wait on each FMA's latency). */
static void dots4(const float *q, const float *r0, const float *r1, const float *r2, const float *r3, int64_t n,
                  float *o) {
    int64_t i = 0;
    o[0] = o[1] = o[2] = o[3] = 0.f;
#ifdef MM_AVX2
    vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + VW <= n; i += VW) {
        const vf u = vload(q + i);
        a0 = vfma(u, vload(r0 + i), a0); a1 = vfma(u, vload(r1 + i), a1);
        a2 = vfma(u, vload(r2 + i), a2); a3 = vfma(u, vload(r3 + i), a3);
    }
    o[0] = vsum(a0); o[1] = vsum(a1); o[2] = vsum(a2); o[3] = vsum(a3);
#endif
    for (; i < n; i++) { o[0] += q[i] * r0[i]; o[1] += q[i] * r1[i]; o[2] += q[i] * r2[i]; o[3] += q[i] * r3[i]; }
}

/* out[c] = sum_n coef[n] * rows[n][c] for c < C: the output held in registers 8 vectors at a time while the rows
 * stream past (an axpy per row would load and store the output once per row). */
static void combine_rows(const float *coef, const float *const *rows, int64_t nrows, int64_t C, float *out) {
    int64_t c0 = 0;
#ifdef MM_AVX2
    for (; c0 + 8 * VW <= C; c0 += 8 * VW) {
        vf a[8];
        for (int j = 0; j < 8; j++) a[j] = vzero();
        for (int64_t n = 0; n < nrows; n++) {
            const vf b = vset1(coef[n]);
            const float *r = rows[n] + c0;
            for (int j = 0; j < 8; j++) a[j] = vfma(b, vload(r + j * VW), a[j]);
        }
        for (int j = 0; j < 8; j++) vstore(out + c0 + j * VW, a[j]);
    }
    for (; c0 + VW <= C; c0 += VW) {
        vf a = vzero();
        for (int64_t n = 0; n < nrows; n++) a = vfma(vset1(coef[n]), vload(rows[n] + c0), a);
        vstore(out + c0, a);
    }
#endif
    for (; c0 < C; c0++) {
        float a = 0.f;
        for (int64_t n = 0; n < nrows; n++) a += coef[n] * rows[n][c0];
        out[c0] = a;
    }
}

/* Absorbed MLA decode, one query per sequence, straight off the paged latent cache (attn_node/model.py's
 * MLA._decode with kernels/mla_decode.py's reference between its two einsums), fp32 throughout:
 *   q_c = q_nope[b, h] @ wkv_b[h, :N]            (W_UK folded into the query)
 *   p   = softmax(scale * (q_c . c_kv[s] + q_pe[b, h] . k_pe[s]))  over s < min(context_lens[b], max_s)
 *   out[b, h] = wkv_b[h, N:] @ (sum_s p[s] c_kv[s])  (W_UV folded into the output)
 * q_nope [B, H, N], q_pe [B, H, R], wkv_b [H, N + V, C] contiguous; cache rows of ldc floats ([c_kv | k_pe]
 * first); block_tables [B, max_blocks]; out [B, H, V]. A context of 0 gives zeros. */
void mm_mla_decode(const float *q_nope, const float *q_pe, const float *wkv_b, const float *cache, int64_t ldc,
                   const int64_t *block_tables, int64_t max_blocks, const int64_t *context_lens, int64_t block_size,
                   int64_t B, int64_t H, int64_t N, int64_t R, int64_t C, int64_t V, int64_t max_s, float scale,
                   float *out, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t nptr = (N > max_s ? N : max_s) + 1;
        float *qc = (float *)malloc(sizeof(float) * (C + 1)), *oc = (float *)malloc(sizeof(float) * (C + 1));
        float *p = (float *)malloc(sizeof(float) * (max_s + 1)), sc[4];
        const float **rows = (const float **)malloc(sizeof(float *) * nptr);
        const float **ctx = (const float **)malloc(sizeof(float *) * (max_s + 1));
        /* One task per sequence, its heads in turn: the context rows are read from memory once and stay in L1/L2
         * for the other heads. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) {
            int64_t len = context_lens[b] < max_s ? context_lens[b] : max_s;
            if (len > max_blocks * block_size) len = max_blocks * block_size;
            for (int64_t s = 0; s < len; s++)
                ctx[s] = cache + (block_tables[b * max_blocks + s / block_size] * block_size + s % block_size) * ldc;
            for (int64_t h = 0; h < H; h++) {
                const int64_t bh = b * H + h;
                const float *qn = q_nope + bh * N, *qp = q_pe + bh * R, *w = wkv_b + h * (N + V) * C;
                float *o = out + bh * V;
                if (len <= 0) { memset(o, 0, sizeof(float) * V); continue; }
                for (int64_t n = 0; n < N; n++) rows[n] = w + n * C;
                combine_rows(qn, rows, N, C, qc);  /* q_c = q_nope @ W_UK */
                float mx = -INFINITY;
                int64_t s = 0;
                for (; s + 4 <= len; s += 4) {
                    float pe[4];
                    dots4(qc, ctx[s], ctx[s + 1], ctx[s + 2], ctx[s + 3], C, sc);
                    dots4(qp, ctx[s] + C, ctx[s + 1] + C, ctx[s + 2] + C, ctx[s + 3] + C, R, pe);
                    for (int j = 0; j < 4; j++) {
                        p[s + j] = scale * (sc[j] + pe[j]);
                        if (p[s + j] > mx) mx = p[s + j];
                    }
                }
                for (; s < len; s++) {
                    p[s] = scale * (dot(qc, ctx[s], C) + dot(qp, ctx[s] + C, R));
                    if (p[s] > mx) mx = p[s];
                }
                float total = 0.f;
                for (s = 0; s < len; s++) { p[s] = expf(p[s] - mx); total += p[s]; }
                const float inv = 1.f / total;
                for (s = 0; s < len; s++) p[s] *= inv;
                combine_rows(p, ctx, len, C, oc);  /* sum_s p[s] c_kv[s] */
                int64_t v = 0;
                for (; v + 4 <= V; v += 4) {  /* out = W_UV @ o_c */
                    const float *u = w + (N + v) * C;
                    dots4(oc, u, u + C, u + 2 * C, u + 3 * C, C, o + v);
                }
                for (; v < V; v++) o[v] = dot(oc, w + (N + v) * C, C);
            }
        }
        free(ctx); free(rows); free(p); free(oc); free(qc);
    }
}

/* RoPE on R dims (attn_node/model.py's Rotary.apply): element (t, h, i) of x at x[t * st + h * sh + i], cos/sin
 * [T, R/2]; out [T, heads, R] with the rotated halves laid out [x1', x2']. Interleaved pairs (2i, 2i + 1), else
 * (i, i + R/2). Each product rounds before the sum, as torch's separate ops do (-std=c11: no FMA contraction),
 * so the result is the torch code's to the bit. */
void mm_rope(const float *x, int64_t st, int64_t sh, int64_t T, int64_t heads, int64_t R, int interleave,
             const float *cos_t, const float *sin_t, float *out) {
    const int64_t half = R / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < heads; h++) {
            const float *xr = x + t * st + h * sh;
            float *o = out + (t * heads + h) * R;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = interleave ? xr[2 * i] : xr[i], x2 = interleave ? xr[2 * i + 1] : xr[half + i];
                const float a = x1 * c[i], b = x2 * s[i], e = x2 * c[i], f = x1 * s[i];
                o[i] = a - b;
                o[half + i] = e + f;
            }
        }
    }
}

int mm_abi_version(void) { return 4; }
