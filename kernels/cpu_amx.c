/* Prefill-sized routed experts on AMX tiles (Intel Sapphire Rapids and later): bf16 weights, fp32 rows,
 * fp32 accumulation (kernels/cpu_kernels.py builds this with cpu_gemv.c; kernels/cpu_paths.py chooses it).
 *
 * Where many rows share each expert the AVX-512 kernels are bound by arithmetic (~320 GFLOP/s on two cores:
 * a prefill of the miniature spends half its time in the routed experts); one AMX TDPBF16PS multiplies a
 * 16 x 32 bf16 tile by a 32 x 16 one in ~16 cycles, ~16x the MACs of a 512-bit FMA in that time.
 *
 * The rows stay fp32-exact: each x is split into three bf16 terms, x = hi + mid + lo exactly (round to nearest
 * at each step leaves at most 16, then 8 significant bits, and bf16 holds 8), each a column of its own; the
 * products of bf16 weights by bf16 terms are exact in fp32 and the tiles accumulate in fp32, so the result is
 * fp32 math over the checkpoint's weights up to summation order, and row r's output is the sum of its three
 * columns, hi + (mid + lo). The weights are the A tiles, read in their stored [N, K] layout (16 rows x 64
 * bytes, row stride K); the rows' terms are the B tiles, packed in AMX's pair layout (VNNI: row p of a tile
 * holds, per column, the terms of k = 2p and 2p + 1 in one 32-bit word).
 *
 * A row's bits depend on nothing but its own values and the weights (every column is summed over k in one
 * order), but they are not the AVX-512 kernel's: kernels/cpu_moe.c's moe_forward gives the experts with many
 * rows to this file and the others to the AVX-512 kernel, as the routed path already switched to torch's GEMMs
 * past a row limit.
 */
#define _GNU_SOURCE
#include "cpu_simd.h"

#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define MM_AMX 1
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Whether this build has the AMX path and the kernel let this process use the tiles (Linux asks each process
 * to request the tile state: ARCH_REQ_XCOMP_PERM). Called once, from Python under its lock. */
int mm_amx_ready(void) {
#ifdef MM_AMX
    static int ready = -1; /* asked once; the request is idempotent, so a race only asks twice */
    int got = __atomic_load_n(&ready, __ATOMIC_ACQUIRE);
    if (got < 0) {
        got = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        __atomic_store_n(&ready, got, __ATOMIC_RELEASE);
    }
    return got;
#else
    return 0;
#endif
}

static int64_t layers_run; /* AMX layers computed in this process: tests and benchmarks see the path taken */

int64_t mm_amx_layers_run(void) { return __atomic_load_n(&layers_run, __ATOMIC_RELAXED); }

#ifdef MM_AMX
#define TERMS 3 /* bf16 terms per fp32 row */
#define COLS 16 /* columns of a B tile (and of a C tile) */
#define KT 32   /* k per tile: 16 pairs of bf16 */

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Every tile 16 rows of 64 bytes: A (16 weight rows x 32 bf16), B (16 pairs x 16 columns), C (16 x 16 fp32). */
static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16;
    _tile_loadconfig(&c);
}

/* An expert's m rows padded to whole column tiles; its B tiles have TERMS * that many columns, term-major:
 * column t * rows_pad(m) + r is term t of row r, so each C tile holds one term of 16 rows. */
static inline int64_t rows_pad(int64_t m) { return (m + COLS - 1) / COLS * COLS; }

/* The words of 16 pairs of bf16 terms: (lo[i], hi[i]) -> lo[i] | hi[i] << 16, in i order. */
static inline __m512i pair_words(__m256bh lo, __m256bh hi) {
    return _mm512_or_si512(_mm512_cvtepu16_epi32((__m256i)lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)hi), 16));
}

/* v[i] lane j <-> v[j] lane i: three stages of 32-bit shuffles (unpack pairs, then 2 x 2 and 4 x 4 blocks of
 * 128-bit lanes). Used to turn 16 rows of 16 values into 16 columns with 16 full stores instead of scatters
 * (perf: scattered 4-byte stores were half the kernel's time). */
static inline void transpose16(__m512 v[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        v[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        v[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        v[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        v[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(v[i], v[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(v[i], v[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(v[i + 8], v[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(v[i + 8], v[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        v[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        v[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* Rows x [m, k] (row stride ldx) -> B [k / 2][TERMS * rp] words (rp = rows_pad(m)): word (p, t * rp + r) is
 * term t of (x[r][2p], x[r][2p + 1]); padding columns zero. */
static void pack_rows(const float *x, int64_t ldx, int64_t m, int64_t k, uint32_t *b) {
    const int64_t rp = rows_pad(m);
    for (int64_t r0 = 0; r0 < rp; r0 += COLS) {
        for (int64_t i = 0; i < k; i += KT) { /* 16 rows x 32 values: 16 rows x 16 pairs per term */
            __m512 lo[16], hi[16];
            for (int q = 0; q < 16; q++) {
                const int live = r0 + q < m;
                lo[q] = live ? _mm512_loadu_ps(x + (r0 + q) * ldx + i) : _mm512_setzero_ps();
                hi[q] = live ? _mm512_loadu_ps(x + (r0 + q) * ldx + i + 16) : _mm512_setzero_ps();
            }
            for (int t = 0; t < TERMS; t++) {
                __m512 words[16];
                for (int q = 0; q < 16; q++) {
                    const __m256bh blo = _mm512_cvtneps_pbh(lo[q]), bhi = _mm512_cvtneps_pbh(hi[q]);
                    words[q] = _mm512_castsi512_ps(
                        _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)blo), (__m256i)bhi, 1));
                    lo[q] = _mm512_sub_ps(lo[q], _mm512_cvtpbh_ps(blo)); /* the exact remainders */
                    hi[q] = _mm512_sub_ps(hi[q], _mm512_cvtpbh_ps(bhi));
                }
                transpose16(words); /* [row][pair] -> [pair][row] */
                uint32_t *tile = b + (t * rp + r0) / COLS * (k / 2) * COLS + (i / 2) * COLS;
                for (int p = 0; p < 16; p++) _mm512_storeu_ps((float *)(tile + p * COLS), words[p]);
            }
        }
    }
}

/* Columns of rows xt [k][rp] (k rows of rp values, rp a multiple of 16) -> B as pack_rows writes it, from pairs
 * of rows of xt: contiguous loads and stores. */
static void pack_columns(const float *xt, int64_t k, int64_t rp, uint32_t *b) {
    for (int64_t p = 0; p < k / 2; p++) {
        for (int64_t r = 0; r < rp; r += COLS) {
            __m512 e = _mm512_loadu_ps(xt + 2 * p * rp + r), o = _mm512_loadu_ps(xt + (2 * p + 1) * rp + r);
            for (int t = 0; t < TERMS; t++) {
                const __m256bh be = _mm512_cvtneps_pbh(e), bo = _mm512_cvtneps_pbh(o);
                _mm512_storeu_si512(b + (t * rp + r) / COLS * (k / 2) * COLS + p * COLS, pair_words(be, bo));
                e = _mm512_sub_ps(e, _mm512_cvtpbh_ps(be));
                o = _mm512_sub_ps(o, _mm512_cvtpbh_ps(bo));
            }
        }
    }
}

/* Two weight tiles (rows a and a2, row stride k) times every column tile of b: out [32][cols] fp32, row j the
 * product of weight row j of a (j < 16) or j - 16 of a2. Two column tiles per pass (4 C tiles), one at the end
 * when their number is odd. */
static void tiles_product(const uint16_t *a, const uint16_t *a2, int64_t k, const uint32_t *b, int64_t cols,
                          float *out) {
    const int64_t wstride = k * 2, bstride = COLS * 4, ostride = cols * 4, btile = (k / 2) * COLS;
    int64_t c0 = 0;
    for (; c0 + 2 * COLS <= cols; c0 += 2 * COLS) {
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t i = 0; i < k; i += KT) {
            const uint32_t *bt = b + c0 / COLS * btile + (i / 2) * COLS;
            if (c0 == 0) /* the first pass reads the weights from memory: fetch the next task's strips meanwhile */
                for (int q = 0; q < 16; q++) {
                    _mm_prefetch((const char *)(a + (16 + q) * k + i), _MM_HINT_T1);
                    _mm_prefetch((const char *)(a2 + (16 + q) * k + i), _MM_HINT_T1);
                }
            _tile_loadd(0, a + i, wstride);
            _tile_loadd(1, a2 + i, wstride);
            _tile_loadd(2, bt, bstride);
            _tile_loadd(3, bt + btile, bstride);
            _tile_dpbf16ps(4, 0, 2);
            _tile_dpbf16ps(5, 0, 3);
            _tile_dpbf16ps(6, 1, 2);
            _tile_dpbf16ps(7, 1, 3);
        }
        _tile_stored(4, out + c0, ostride);
        _tile_stored(5, out + c0 + COLS, ostride);
        _tile_stored(6, out + 16 * cols + c0, ostride);
        _tile_stored(7, out + 16 * cols + c0 + COLS, ostride);
    }
    if (c0 < cols) {
        _tile_zero(4);
        _tile_zero(6);
        for (int64_t i = 0; i < k; i += KT) {
            _tile_loadd(0, a + i, wstride);
            _tile_loadd(1, a2 + i, wstride);
            _tile_loadd(2, b + c0 / COLS * btile + (i / 2) * COLS, bstride);
            _tile_dpbf16ps(4, 0, 2);
            _tile_dpbf16ps(6, 1, 2);
        }
        _tile_stored(4, out + c0, ostride);
        _tile_stored(6, out + 16 * cols + c0, ostride);
    }
}

/* 16 rows' values from one row of C (out of tiles_product): hi + (mid + lo). */
static inline __m512 terms_sum(const float *c, int64_t rp, int64_t r) {
    return _mm512_add_ps(_mm512_loadu_ps(c + r), _mm512_add_ps(_mm512_loadu_ps(c + rp + r),
                                                                _mm512_loadu_ps(c + 2 * rp + r)));
}

/* exp(x) for x <= 0 (silu's exp(-|g|)): 2^n * 2^f by a degree-6 polynomial in f in [-0.5, 0.5], ~2 ulp; large
 * negative x underflows to 0. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)); /* x / ln 2 */
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  /* x - n ln 2, two parts */
    const __m512 g = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), f);
    __m512 p = _mm512_set1_ps(1.0f / 720), one = _mm512_set1_ps(1.f);
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, g, one);
    p = _mm512_fmadd_ps(p, g, one);
    return _mm512_scalef_ps(p, n);
}

/* silu(g) = g * sigmoid(g), sigmoid through exp(-|g|) so that nothing overflows. */
static inline __m512 silu16(__m512 g) {
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, e)); /* sigmoid(|g|) */
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mul_ps(g, _mm512_mask_mul_ps(s, neg, e, s));  /* sigmoid(-|g|) = exp(-|g|) sigmoid(|g|) */
}

typedef struct {
    int64_t *busy, nbusy, most;  /* slots with rows; the most rows of any */
    int64_t *bx_at, *h_at;       /* each slot's packed rows (words) and its h^T (floats) in the workspace */
    uint32_t *bx, *bh;           /* packed x [d / 2][cols], packed h [I / 2][cols], cols = TERMS * rows_pad(m) */
    float *ht;                   /* h^T [I][rows_pad(m)] per slot */
    float *c;                    /* per thread: [32][TERMS * rows_pad(most)] */
} amx_work;

/* Carve the workspace for the slots with min_rows rows or more (base NULL: only size it); returns its size. */
static int64_t carve(const int64_t *offs, int64_t n_slots, int64_t min_rows, int64_t d, int64_t inter, int nthreads,
                     char *base, amx_work *w, int64_t *busy, int64_t *bx_at, int64_t *h_at) {
    int64_t nbusy = 0, most = 0, rows = 0;
    for (int64_t s = 0; s < n_slots; s++) {
        const int64_t m = offs[s + 1] - offs[s] >= min_rows ? offs[s + 1] - offs[s] : 0;  /* the slots taken */
        if (busy) {
            bx_at[s] = rows * TERMS * (d / 2);
            h_at[s] = rows * inter;
            if (m > 0) busy[nbusy] = s;
        }
        nbusy += m > 0;
        most = m > most ? m : most;
        rows += rows_pad(m > 0 ? m : 0);
    }
    const int64_t bx = rows * TERMS * (d / 2) * 4, bh = rows * TERMS * (inter / 2) * 4, ht = rows * inter * 4;
    const int64_t c = 32 * TERMS * rows_pad(most) * 4 + 64;
    if (base) {
        w->busy = busy, w->nbusy = nbusy, w->most = most, w->bx_at = bx_at, w->h_at = h_at;
        w->bx = (uint32_t *)base, w->bh = (uint32_t *)(base + bx), w->ht = (float *)(base + bx + bh);
        w->c = (float *)(base + bx + bh + ht);
    }
    return bx + bh + ht + c * nthreads;
}
#endif

/* The calling thread's workspace of at least `bytes`, kept for its next call: a fresh prefill-sized buffer per
 * call paid its page faults and zeroing every time (~10% of a layer's time under perf). It takes ~64 KB per
 * padded row at DeepSeek-V3's sizes (the rows' terms, their hidden and its transpose), so one past
 * WORKSPACE_KEEP (a long prefill's) is freed after its call (release_large_workspace) rather than held. */
#define WORKSPACE_KEEP ((int64_t)64 << 20)
static __thread void *ws_buf;
static __thread int64_t ws_have;

static void *thread_workspace(int64_t bytes) {
    if (bytes > ws_have) {
        free(ws_buf);
        ws_buf = aligned_alloc(64, (size_t)((bytes + 63) / 64 * 64));
        ws_have = ws_buf ? bytes : 0;
    }
    return ws_buf;
}

static void release_large_workspace(void) {
    if (ws_have > WORKSPACE_KEEP) {
        free(ws_buf);
        ws_buf = NULL;
        ws_have = 0;
    }
}

/* mm_moe_swiglu's contract (kernels/cpu_moe.c) over bf16 experts on AMX tiles, for the slots with min_rows (>= 1)
 * rows or more: xs [A, d] sorted by slot (rows offs[s]..offs[s+1] to slot s), w13 [n_slots, 2I, d] bf16 =
 * [gate; up], w2 [n_slots, d, I] bf16; ys [A, d] receives w2 @ (silu(gate x) * up x) for those slots' rows
 * (the others' rows are left as they are). Returns 0, or -1 (nothing written) when this build or process has
 * no AMX, d or I is not a multiple of 32, or the workspace cannot be had. */
int mm_moe_swiglu_amx(const float *xs, const int64_t *offs, int64_t n_slots, int64_t min_rows, const uint16_t *w13,
                      const uint16_t *w2, int64_t d, int64_t inter, float *ys, int nthreads) {
#ifdef MM_AMX
    if (mm_amx_ready() != 1 || d % KT || inter % KT) return -1;
    min_rows = min_rows > 1 ? min_rows : 1;
    char *work = (char *)thread_workspace(carve(offs, n_slots, min_rows, d, inter, nthreads, NULL, NULL, NULL, NULL,
                                                NULL));
    int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * 3 * (size_t)(n_slots > 0 ? n_slots : 1));
    if (!work || !idx) {
        free(idx);
        return -1;
    }
    amx_work w;
    carve(offs, n_slots, min_rows, d, inter, nthreads, work, &w, idx, idx + n_slots, idx + 2 * n_slots);
    const int64_t gblocks = inter / 16, dblocks = d / 32, nbusy = w.nbusy, cmax = TERMS * rows_pad(w.most);
#pragma omp parallel num_threads(nthreads)
    {
        configure_tiles();
        float *c = w.c + (int64_t)omp_get_thread_num() * (32 * cmax + 16);
#pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < nbusy; j++) {
            const int64_t s = w.busy[j];
            pack_rows(xs + offs[s] * d, d, offs[s + 1] - offs[s], d, w.bx + w.bx_at[s]);
        }
        /* gate and up of 16 intermediate rows per task, h^T = silu(g) * u */
#pragma omp for schedule(dynamic, grab(nbusy * gblocks, nthreads, 1))
        for (int64_t j = 0; j < nbusy * gblocks; j++) {
            const int64_t s = w.busy[j / gblocks], i0 = (j % gblocks) * 16, rp = rows_pad(offs[s + 1] - offs[s]);
            const uint16_t *we = w13 + s * 2 * inter * d;
            tiles_product(we + i0 * d, we + (inter + i0) * d, d, w.bx + w.bx_at[s], TERMS * rp, c);
            float *ht = w.ht + w.h_at[s] + i0 * rp;
            for (int n = 0; n < 16; n++)
                for (int64_t r = 0; r < rp; r += COLS) {
                    const __m512 g = terms_sum(c + n * TERMS * rp, rp, r), u = terms_sum(c + (16 + n) * TERMS * rp, rp, r);
                    _mm512_storeu_ps(ht + n * rp + r, _mm512_mul_ps(silu16(g), u));
                }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < nbusy; j++) {
            const int64_t s = w.busy[j];
            pack_columns(w.ht + w.h_at[s], inter, rows_pad(offs[s + 1] - offs[s]),
                         w.bh + w.bx_at[s] / (d / 2) * (inter / 2));
        }
        /* down: 32 output rows per task */
#pragma omp for schedule(dynamic, grab(nbusy * dblocks, nthreads, 1))
        for (int64_t j = 0; j < nbusy * dblocks; j++) {
            const int64_t s = w.busy[j / dblocks], n0 = (j % dblocks) * 32, r0 = offs[s], m = offs[s + 1] - r0;
            const int64_t rp = rows_pad(m);
            const uint16_t *we = w2 + (s * d + n0) * inter;
            tiles_product(we, we + 16 * inter, inter, w.bh + w.bx_at[s] / (d / 2) * (inter / 2), TERMS * rp, c);
            for (int64_t r = 0; r < m; r += COLS)
                for (int nh = 0; nh < 32; nh += 16) { /* 16 outputs x 16 rows -> 16 rows of 16 outputs */
                    __m512 v[16];
                    for (int n = 0; n < 16; n++) v[n] = terms_sum(c + (nh + n) * TERMS * rp, rp, r);
                    transpose16(v);
                    for (int q = 0; q < 16 && r + q < m; q++) _mm512_storeu_ps(ys + (r0 + r + q) * d + n0 + nh, v[q]);
                }
        }
        _tile_release();
    }
    free(idx);
    release_large_workspace();
    __atomic_fetch_add(&layers_run, 1, __ATOMIC_RELAXED);
    return 0;
#else
    (void)xs, (void)offs, (void)n_slots, (void)min_rows, (void)w13, (void)w2, (void)d, (void)inter, (void)ys;
    (void)nthreads;
    return -1;
#endif
}
