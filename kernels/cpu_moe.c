/* The routed experts' layer and the dense SwiGLU on CPU (kernels/cpu_kernels.py builds this with cpu_gemv.c).
 *
 * moe_swiglu runs every busy expert of a layer in two parallel regions (gate/up with silu(g) * u fused, then
 * down), so one call per layer replaces a Python loop of small GEMMs; moe_forward adds the routing bookkeeping
 * around it (slots, a stable counting sort, gather, weighting, the per-row sums), and mm_swiglu is the dense
 * MLP's (shared experts, dense layers). The products themselves are cpu_gemv.c's cpu_block_product (FP8 experts'
 * blocks: cpu_fp8.c), over long runs of adjacent weight blocks per thread (grab, cpu_simd.h).
 */
#include "cpu_simd.h"

/* cpu_block_product over an expert matrix in any weight dtype (FP8: kernels/cpu_fp8.c). */
static void expert_block(const float *x, int64_t ldx, int64_t m, const void *w, int wdtype, const float *scale,
                         const fp8_scales *q, int64_t n0, int nb, int64_t k, float *scratch, float *out, int64_t ldo) {
    if (wdtype == W_E4M3)
        cpu_fp8_block_product(x, ldx, m, (const uint8_t *)w, scale, q, n0, nb, k, scratch, out, ldo);
    else
        cpu_block_product(x, ldx, m, w, wdtype, n0, nb, k, out, ldo);
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* Routed experts of one layer, rows sorted by expert: xs [A, d]; rows offs[s]..offs[s+1] go to slot s
 * (n_slots slots, offs has n_slots + 1 entries). w13 [n_slots, 2I, d] = [gate; up], w2 [n_slots, d, I].
 * h [A, I] is scratch; ys [A, d] receives w2 @ (silu(gate x) * up x) per row. */
static int moe_swiglu(const float *xs, const int64_t *offs, int64_t n_slots, int64_t skip_from, const void *w13,
                      const void *w2, int wdtype, const fp8_scales *q, int64_t d, int64_t inter, float *h, float *ys,
                      int nthreads) {
    const int64_t esz = wdtype == W_F32 ? 4 : wdtype == W_E4M3 ? 1 : 2;
    /* FP8: the scale grid of each expert's w13 [2I, d] and w2 [d, I] (one matrix each, as the reference reads them) */
    const int64_t g13 = q ? ((2 * inter + q->bn - 1) / q->bn) * ((d + q->bk - 1) / q->bk) : 0;
    const int64_t g2 = q ? ((d + q->bn - 1) / q->bn) * ((inter + q->bk - 1) / q->bk) : 0;
    int64_t *busy = (int64_t *)malloc(sizeof(int64_t) * (n_slots > 0 ? n_slots : 1)), nbusy = 0;
    if (!busy) return -1;
    for (int64_t s = 0; s < n_slots; s++)  /* skip_from > 0: slots with that many rows are computed elsewhere */
        if (offs[s + 1] > offs[s] && (skip_from <= 0 || offs[s + 1] - offs[s] < skip_from)) busy[nbusy++] = s;
    const int64_t gblocks = (inter + NB - 1) / NB, dblocks = (d + NB - 1) / NB;
    int failed = 0; /* a thread without its buffers: its share is skipped and the call fails */
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t kmax = d > inter ? d : inter;
        float *scratch = wdtype == W_E4M3 ? (float *)malloc(sizeof(float) * NB * kmax) : NULL;  /* FP8's dequant */
        float *gu = (float *)malloc(sizeof(float) * 2 * NB * (offs[n_slots] - offs[0] + 1));
        const int ok = gu != NULL && (wdtype != W_E4M3 || scratch != NULL);
        if (!ok) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
#pragma omp for schedule(dynamic, grab(nbusy * gblocks, nthreads, 8))
        for (int64_t j = 0; j < nbusy * gblocks; j++) {
            if (!ok) continue;
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
            if (!ok) continue;
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
    return failed ? -1 : 0;
}

/* 0, or -1 when a buffer could not be allocated (ys is then incomplete). */
int mm_moe_swiglu(const float *xs, const int64_t *offs, int64_t n_slots, const void *w13, const void *w2,
                  int wdtype, int64_t d, int64_t inter, float *h, float *ys, int nthreads) {
    return moe_swiglu(xs, offs, n_slots, 0, w13, w2, wdtype, NULL, d, inter, h, ys, nthreads);
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
 * sum over its hosted assignments in k order of w * expert(x). amx_min_rows > 0: bf16 experts with that many
 * rows or more take the AMX tiles (kernels/cpu_amx.c) where AMX can run, the others moe_swiglu: a row's result
 * depends on the other rows only through which of the two its expert took.
 * Replaces ~25 small torch ops per layer (slot lookup, sort, gather, offsets, weighting, index_add). */
static int moe_forward(const float *x, int64_t ldx, int64_t t, const int64_t *topk_idx, const float *topk_w,
                       int64_t top_k, const int64_t *slot_of, int64_t n_experts, int64_t n_slots, const void *w13,
                       const void *w2, int wdtype, const fp8_scales *q, int64_t d, int64_t inter,
                       int64_t amx_min_rows, float *out, int nthreads) {
    const int64_t n = t * top_k;
    int64_t *slot = (int64_t *)malloc(sizeof(int64_t) * (n > 0 ? n : 1));
    int64_t *offs = (int64_t *)calloc((size_t)n_slots + 2, sizeof(int64_t));
    int64_t *pos = (int64_t *)malloc(sizeof(int64_t) * (n > 0 ? n : 1));  /* row of xs of each assignment */
    float *xs = NULL, *ys = NULL, *h = NULL;
    int64_t *fill = NULL, *by_slot = NULL;
    int rc = -1; /* until every buffer is had: prefill-sized layers take hundreds of MB */
    if (!slot || !offs || !pos) goto done;
    for (int64_t a = 0; a < n; a++) {
        const int64_t e = topk_idx[a];
        slot[a] = e >= 0 && e < n_experts ? slot_of[e] : -1;
        if (slot[a] >= n_slots) slot[a] = -1;
        if (slot[a] >= 0) offs[slot[a] + 1]++;
    }
    for (int64_t s = 0; s < n_slots; s++) offs[s + 1] += offs[s];
    const int64_t total = offs[n_slots];
    xs = (float *)malloc(sizeof(float) * d * (total > 0 ? total : 1));
    ys = (float *)malloc(sizeof(float) * d * (total > 0 ? total : 1));
    h = (float *)malloc(sizeof(float) * inter * (total > 0 ? total : 1));
    fill = (int64_t *)malloc(sizeof(int64_t) * (n_slots > 0 ? n_slots : 1));
    by_slot = (int64_t *)malloc(sizeof(int64_t) * (top_k > 0 ? top_k : 1));
    if (!xs || !ys || !h || !fill || !by_slot) goto done;
    memcpy(fill, offs, sizeof(int64_t) * (n_slots > 0 ? n_slots : 1));
    for (int64_t a = 0; a < n; a++) {  /* counting sort by slot, stable: rows in order within an expert */
        if (slot[a] < 0) continue;
        pos[a] = fill[slot[a]]++;
        memcpy(xs + pos[a] * d, x + (a / top_k) * ldx, sizeof(float) * d);
    }
    int64_t most = 0;
    for (int64_t s = 0; s < n_slots; s++) most = offs[s + 1] - offs[s] > most ? offs[s + 1] - offs[s] : most;
    /* experts with amx_min_rows rows or more on AMX, the rest here (each expert's rows by one of the two) */
    const int amx = total > 0 && wdtype == W_BF16 && amx_min_rows > 0 && most >= amx_min_rows &&
                    mm_moe_swiglu_amx(xs, offs, n_slots, amx_min_rows, w13, w2, d, inter, ys, nthreads) == 0;
    if (total > 0 && moe_swiglu(xs, offs, n_slots, amx ? amx_min_rows : 0, w13, w2, wdtype, q, d, inter, h, ys,
                                nthreads) != 0)
        goto done;
    /* Each row's sum runs in ascending slot order (stable), as the shard's torch path adds its sorted assignments
       with index_add_: then a row's bits do not depend on which side of the row limit its batch fell. */
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
    rc = 0;
done:
    free(by_slot);
    free(fill); free(h); free(ys); free(xs); free(pos); free(offs); free(slot);
    return rc;
}

/* 0, or -1 when a buffer could not be allocated (out is then incomplete). */
int mm_moe_forward(const float *x, int64_t ldx, int64_t t, const int64_t *topk_idx, const float *topk_w,
                   int64_t top_k, const int64_t *slot_of, int64_t n_experts, int64_t n_slots, const void *w13,
                   const void *w2, int wdtype, int64_t d, int64_t inter, int64_t amx_min_rows, float *out,
                   int nthreads) {
    return moe_forward(x, ldx, t, topk_idx, topk_w, top_k, slot_of, n_experts, n_slots, w13, w2, wdtype, NULL, d,
                       inter, amx_min_rows, out, nthreads);
}

/* mm_moe_forward over FP8 (e4m3fn) experts with their fp32 block scales s13, s2 (fp8_scales' shapes), blocks
 * of bn x bk: each block of weights is dequantized into L1 as it streams (1 byte read per weight). */
int mm_moe_forward_fp8(const float *x, int64_t ldx, int64_t t, const int64_t *topk_idx, const float *topk_w,
                       int64_t top_k, const int64_t *slot_of, int64_t n_experts, int64_t n_slots, const uint8_t *w13,
                       const float *s13, const uint8_t *w2, const float *s2, int64_t bn, int64_t bk, int64_t d,
                       int64_t inter, float *out, int nthreads) {
    const fp8_scales q = {s13, s2, bn, bk};
    return moe_forward(x, ldx, t, topk_idx, topk_w, top_k, slot_of, n_experts, n_slots, w13, w2, W_E4M3, &q, d,
                       inter, 0, out, nthreads);
}
