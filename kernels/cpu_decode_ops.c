/* The decode step's small fused ops beside the products (kernels/cpu_gemv.c): RMSNorm, the absorbed MLA decode
 * over the paged latent cache and RoPE, each one call where torch ran several ops, each op costing more than
 * the bytes it reads at decode sizes (see kernels/README.md). fp32 throughout. */
#include "cpu_simd.h"

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
    const int64_t want = B > 0 ? (2 * (int64_t)nthreads + B - 1) / B : 1;  /* chunks of heads per sequence */
    const int64_t chunks = want < 1 ? 1 : want > H ? (H > 0 ? H : 1) : want, per_chunk = (H + chunks - 1) / chunks;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t nptr = (N > max_s ? N : max_s) + 1;
        float *qc = (float *)malloc(sizeof(float) * (C + 1)), *oc = (float *)malloc(sizeof(float) * (C + 1));
        float *p = (float *)malloc(sizeof(float) * (max_s + 1)), sc[4];
        const float **rows = (const float **)malloc(sizeof(float *) * nptr);
        const float **ctx = (const float **)malloc(sizeof(float *) * (max_s + 1));
        /* One task per sequence and chunk of its heads: a chunk's heads reuse the context rows from L1/L2 once
         * read; the heads split into chunks only where there are fewer sequences than twice the threads (batch 1
         * would otherwise run on one thread). A head's arithmetic is the same whatever its chunk. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * chunks; task++) {
            const int64_t b = task / chunks, h0 = (task % chunks) * per_chunk;
            const int64_t h1 = h0 + per_chunk < H ? h0 + per_chunk : H;
            int64_t len = context_lens[b] < max_s ? context_lens[b] : max_s;
            if (len > max_blocks * block_size) len = max_blocks * block_size;
            for (int64_t s = 0; s < len; s++)
                ctx[s] = cache + (block_tables[b * max_blocks + s / block_size] * block_size + s % block_size) * ldc;
            for (int64_t h = h0; h < h1; h++) {
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

/* The latent cache store (kernels/cache_store.py's store_latent_ref, one call for its eight ops): row t of
 * [c_kv | k_pe] goes to cache row slot_mapping[t] (row stride ldc), negative slots skipped. Returns the first
 * t whose slot is >= n_slots (nothing written for it or after it), or -1 when every row was stored. */
int64_t mm_store_latent(float *cache, int64_t ldc, int64_t n_slots, const float *c_kv, int64_t ld_c, const float *k_pe,
                        int64_t ld_r, const int64_t *slot_mapping, int64_t T, int64_t C, int64_t R) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t s = slot_mapping[t];
        if (s < 0) continue;
        if (s >= n_slots) return t;
        memcpy(cache + s * ldc, c_kv + t * ld_c, sizeof(float) * C);
        memcpy(cache + s * ldc + C, k_pe + t * ld_r, sizeof(float) * R);
    }
    return -1;
}
