/* What the CPU kernels share (kernels/cpu_gemv.c: the products over weights; kernels/cpu_decode_ops.c: the
 * rest of a decode step): the vector width and its few operations, the weight dtypes and their widening. */
#ifndef MM_CPU_SIMD_H
#define MM_CPU_SIMD_H
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
#define vset1(a) _mm512_set1_ps(a)
#define vmul(a, b) _mm512_mul_ps(a, b)
/* The sum of a vector's lanes as a tree: halves, quarters, pairs, the last two (GCC's _mm512_reduce_add_ps
 * order, written out so that vsum16 below can follow it exactly whatever the compiler). */
static inline float vsum(__m512 v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}
/* Lane L of the result = vsum(u[4 * (L % 4) + L / 4]), each summed in vsum's tree, for 16 vectors at once: 45
 * shuffles and adds where 16 vsums take ~110, which at decode sizes (a few hundred FMAs per tile) matter.
 * Each level adds the very lane pairs vsum adds (addition commutes bit for bit), so a row's bits do not depend
 * on which of the two reduced it. Pass zero vectors for unused slots: they only ever meet each other. */
static inline __m512 vsum16(const __m512 u[16]) {
    __m512 a[8], b[4], c[2];
    for (int j = 0; j < 8; j++)  /* 512 -> 256: [u0 halves | u1 halves] */
        a[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int j = 0; j < 4; j++)  /* 256 -> 128: one 128-bit lane per vector */
        b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int j = 0; j < 2; j++)  /* 4 -> 2 within each 128-bit lane: (0 + 2, 1 + 3) */
        c[j] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * j], b[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * j], b[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),  /* 2 -> 1 */
                         _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#define MM_VSUM16 1
static inline vf vwiden(const uint16_t *s, int bf16) {
    __m256i h = _mm256_loadu_si256((const __m256i *)s);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}
/* VW e4m3 bytes -> fp32, each 2^-8 times its value (see e4m3_to_f32). */
static inline vf vwiden_e4m3(const uint8_t *s) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)s));
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBF80)));
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
#define vmul(a, b) _mm256_mul_ps(a, b)
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
/* VW e4m3 bytes -> fp32, each 2^-8 times its value (see e4m3_to_f32). */
static inline vf vwiden_e4m3(const uint8_t *s) {
    __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)s));
    return _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16((short)0xBF80)));
}
#endif

/* W_E4M3: FP8 (e4m3fn) block-quantized weights with fp32 scales per (bn x bk) block (DeepSeek-V3's). */
enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2, W_E4M3 = 3 };
#define NB 4

/* FP8 block scales of one expert's two matrices (NULL = not FP8): scale[(n / bn) * cols + c / bk] is the
 * fp32 scale of weight [n, c], cols = ceil(k / bk) for a matrix of row length k. */
typedef struct {
    const float *s13, *s2;  /* [n_slots, ceil(2I / bn), ceil(d / bk)], [n_slots, ceil(d / bn), ceil(I / bk)] */
    int64_t bn, bk;
} fp8_scales;

/* The products cpu_gemv.c and cpu_fp8.c share (one library; hidden outside it). */
#define MM_INTERNAL __attribute__((visibility("hidden")))
/* Rows [n0, n0 + nb) of y = x @ w^T for m x rows (w in its stored dtype): out[mi * ldo + (n - n0)]. */
MM_INTERNAL void cpu_block_product(const float *x, int64_t ldx, int64_t m, const void *w, int wdtype, int64_t n0,
                                   int nb, int64_t k, float *out, int64_t ldo);
/* The same over e4m3 w with its block scales (scale: the expert matrix's grid), scratch NB * k floats. */
MM_INTERNAL void cpu_fp8_block_product(const float *x, int64_t ldx, int64_t m, const uint8_t *w, const float *scale,
                                       const fp8_scales *q, int64_t n0, int nb, int64_t k, float *scratch,
                                       float *out, int64_t ldo);

/* The routed experts' layer on AMX tiles (kernels/cpu_amx.c) for the slots with min_rows rows or more: 0, or -1
 * where it cannot run (then nothing is written). */
int mm_moe_swiglu_amx(const float *xs, const int64_t *offs, int64_t n_slots, int64_t min_rows, const uint16_t *w13,
                      const uint16_t *w2, int64_t d, int64_t inter, float *ys, int nthreads);

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

/* e4m3fn -> fp32, exact: sign-extended to 16 bits and shifted, its (exponent, mantissa) sit where fp16's
 * low exponent bits and mantissa do, which makes an fp16 of 2^-8 times its value (the exponent bias is 15
 * against 7; e4m3 subnormals land on fp16 subnormals), and F16C widens that exactly. 2^-8 times a weight
 * times 2^8 times its scale rounds as weight times scale does (powers of two), so the block scale carries
 * the 2^8. The NaN codes (0x7f, 0xff) read as +-480 here and in the vector path alike: quantizers write
 * none (the largest finite value is 448). */
static inline float e4m3_to_f32(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    const float v = e ? ldexpf(1.f + m / 8.f, e - 7) : ldexpf(m / 8.f, -6);
    return b & 0x80 ? -v : v;
}

/* Work items per grab of a dynamic schedule over n items: a quarter of a thread's share (at least `least`).
 * Long runs of adjacent items keep each thread's reads one sequential stream, which the hardware prefetchers
 * follow across pages: the routed experts read 20-27% faster than in grabs of 8 blocks (scripts/
 * bench_cpu_experts.py, 2 threads, Xeon with AVX-512), as fast as a static split; dynamic still lets a thread
 * the OS preempts hold the others up by one grab at most. */
static inline int64_t grab(int64_t n, int nthreads, int64_t least) {
    const int64_t g = n / (4 * (int64_t)nthreads);
    return g > least ? g : least;
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

#endif
