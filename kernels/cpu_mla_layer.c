/* One MLA layer's decode step in one call (kernels/cpu_mla_layer.py): attn_node/model.py's MLA.forward for a
 * batch of one query per sequence, as the chain of C calls its unfused CPU path makes (kernels/cpu_paths.py),
 * so every value is that path's to the bit; what goes is the Python between them (~30 torch ops and 8 ctypes
 * calls per layer, each costing more than its arithmetic at decode sizes: kernels/README.md).
 *
 *   q      = wq x                      (or wq_b rmsnorm(wq_a x), q_lora_rank checkpoints)   [T, H, N + R]
 *   q_pe   = rope(q[..., N:])                                                                [T, H, R]
 *   kv     = wkv_a x;  c_kv = rmsnorm(kv[:, :C]);  k_pe = rope(kv[:, C:])                    [T, C], [T, R]
 *   cache[slot_mapping[t]] = [c_kv[t] | k_pe[t]]
 *   o[b]   = mla_decode(q_nope[token_index[b]], q_pe[token_index[b]])                        [B, H, V]
 *   y      = wo o[out_rows]                                                                   [T, D]
 */
#include "cpu_simd.h"

void mm_linear(const float *x, int64_t ldx, int64_t m, const void *w, int wdtype, int64_t n, int64_t k, float *y,
               int nthreads);
void mm_rmsnorm(const float *x, int64_t ldx, int64_t m, int64_t d, const float *w, float eps, float *y, int64_t ldy);
void mm_rope(const float *x, int64_t st, int64_t sh, int64_t T, int64_t heads, int64_t R, int interleave,
             const float *cos_t, const float *sin_t, float *out);
int64_t mm_store_latent(float *cache, int64_t ldc, int64_t n_slots, const float *c_kv, int64_t ld_c, const float *k_pe,
                        int64_t ld_r, const int64_t *slot_mapping, int64_t T, int64_t C, int64_t R);
void mm_mla_decode(const float *q_nope, const float *q_pe, const float *wkv_b, const float *cache, int64_t ldc,
                   const int64_t *block_tables, int64_t max_blocks, const int64_t *context_lens, int64_t block_size,
                   int64_t B, int64_t H, int64_t N, int64_t R, int64_t C, int64_t V, int64_t max_s, float scale,
                   float *out, int nthreads);

/* The layer's weights and shapes (fixed per layer); wq is NULL where the checkpoint has wq_a/q_norm/wq_b. */
typedef struct {
    const void *wq, *wq_a, *wq_b, *wkv_a, *wo;  /* projections, one stored dtype (wdtype) */
    const float *q_norm, *kv_norm, *wkv_b;      /* fp32: [Lq], [C], [H, N + V, C] */
    float q_eps, kv_eps, scale;
    int32_t wdtype, interleave;
    int64_t D, Lq, H, N, R, C, V;
} mm_mla_weights;

/* The step's tensors: x [T, D] contiguous; cos/sin [T, R/2]; cache [n_slots, ldc] rows; token_index [B] rows of
 * the batch, one query per sequence; block_tables [B, max_blocks]; out_rows [T] rows of the decode output. */
typedef struct {
    const float *x, *cos_t, *sin_t;
    float *cache, *y;
    const int64_t *slot_mapping, *token_index, *block_tables, *context_lens, *out_rows;
    int64_t T, B, ldc, n_slots, max_blocks, block_size, max_s;
} mm_mla_step;

/* 0 when every index the step reads is in range; else a code naming the first bad table (the caller raises). */
static int64_t check_indices(const mm_mla_step *s) {
    for (int64_t b = 0; b < s->B; b++)
        if (s->token_index[b] < 0 || s->token_index[b] >= s->T) return 1;
    for (int64_t t = 0; t < s->T; t++)
        if (s->out_rows[t] < 0 || s->out_rows[t] >= s->B) return 2;
    for (int64_t i = 0; i < s->B * s->max_blocks; i++)  /* a block's last slot must be in the cache */
        if (s->block_tables[i] < 0 || (s->block_tables[i] + 1) * s->block_size > s->n_slots) return 3;
    return 0;
}

/* Returns -1 when done; 1-3 for a bad token_index / out_rows / block_tables entry (nothing computed); or
 * 100 + t for the first row whose slot is past the cache (the rows before it stored, as the unfused path's). */
int64_t mm_mla_layer(const mm_mla_weights *w, const mm_mla_step *s, int nthreads) {
    const int64_t T = s->T, B = s->B, H = w->H, N = w->N, R = w->R, C = w->C, V = w->V, QW = H * (N + R);
    const int64_t bad = check_indices(s);
    if (bad) return bad;
    float *q = malloc(sizeof(float) * (T * QW + 1)), *kv = malloc(sizeof(float) * (T * (C + R) + 1));
    float *q_pe = malloc(sizeof(float) * (T * H * R + 1)), *c_kv = malloc(sizeof(float) * (T * C + 1));
    float *k_pe = malloc(sizeof(float) * (T * R + 1)), *qn = malloc(sizeof(float) * (B * H * N + 1));
    float *qp = malloc(sizeof(float) * (B * H * R + 1)), *o = malloc(sizeof(float) * (B * H * V + 1));
    float *og = malloc(sizeof(float) * (T * H * V + 1));
    int64_t ret = -1;
    if (w->wq) {
        mm_linear(s->x, w->D, T, w->wq, w->wdtype, QW, w->D, q, nthreads);
    } else {
        float *qa = malloc(sizeof(float) * (T * w->Lq + 1)), *qan = malloc(sizeof(float) * (T * w->Lq + 1));
        mm_linear(s->x, w->D, T, w->wq_a, w->wdtype, w->Lq, w->D, qa, nthreads);
        mm_rmsnorm(qa, w->Lq, T, w->Lq, w->q_norm, w->q_eps, qan, w->Lq);
        mm_linear(qan, w->Lq, T, w->wq_b, w->wdtype, QW, w->Lq, q, nthreads);
        free(qan); free(qa);
    }
    mm_rope(q + N, QW, N + R, T, H, R, w->interleave, s->cos_t, s->sin_t, q_pe);
    mm_linear(s->x, w->D, T, w->wkv_a, w->wdtype, C + R, w->D, kv, nthreads);
    mm_rmsnorm(kv, C + R, T, C, w->kv_norm, w->kv_eps, c_kv, C);
    mm_rope(kv + C, C + R, 0, T, 1, R, w->interleave, s->cos_t, s->sin_t, k_pe);
    const int64_t past = mm_store_latent(s->cache, s->ldc, s->n_slots, c_kv, C, k_pe, R, s->slot_mapping, T, C, R);
    if (past >= 0) {
        ret = 100 + past;
        goto done;
    }
    for (int64_t b = 0; b < B; b++) {  /* the sequences' queries, gathered contiguous */
        const int64_t t = s->token_index[b];
        for (int64_t h = 0; h < H; h++) {
            memcpy(qn + (b * H + h) * N, q + t * QW + h * (N + R), sizeof(float) * N);
            memcpy(qp + (b * H + h) * R, q_pe + (t * H + h) * R, sizeof(float) * R);
        }
    }
    mm_mla_decode(qn, qp, w->wkv_b, s->cache, s->ldc, s->block_tables, s->max_blocks, s->context_lens, s->block_size,
                  B, H, N, R, C, V, s->max_s, w->scale, o, nthreads);
    for (int64_t t = 0; t < T; t++) memcpy(og + t * H * V, o + s->out_rows[t] * H * V, sizeof(float) * H * V);
    mm_linear(og, H * V, T, w->wo, w->wdtype, w->D, H * V, s->y, nthreads);
done:
    free(og); free(o); free(qp); free(qn); free(k_pe); free(c_kv); free(q_pe); free(kv); free(q);
    return ret;
}
