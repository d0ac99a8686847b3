/* FP8 (e4m3fn) block-quantized experts on CPU: DeepSeek-V3's weights kept one byte each with fp32 scales per
 * (bn x bk) block (kernels/cpu_fp8.py; mm_moe_forward_fp8 in cpu_gemv.c runs a layer through here).
 *
 * Each block of NB weight rows is dequantized into the caller's fp32 scratch as it streams (it stays in L1)
 * and multiplied by cpu_block_product as fp32 weights: the bits of the same product over the checkpoint's
 * dequantized fp32 weights (moemesh.model.checkpoint.dequantize_fp8_blockwise), since the dequantized value
 * is the same fp32 number and the product sums it in the same order. One x row reuses no weight, so it is
 * dequantized in registers instead (row_dot_rows_e4m3), in row_dot_rows' summation order.
 */
#include "cpu_simd.h"

/* Rows [n0, n0 + nb) of e4m3 w (row length k, scales `scale` with `cols` per block row) into fp32 dst
 * (nb * k): each weight times its block's scale, the bits of moemesh.model.checkpoint's dequantization. */
static void dequant_rows(const uint8_t *w, const float *scale, int64_t cols, int64_t bn, int64_t bk, int64_t n0,
                         int nb, int64_t k, float *dst) {
    for (int r = 0; r < nb; r++) {
        const int64_t n = n0 + r;
        const uint8_t *q = w + n * k;
        const float *srow = scale + (n / bn) * cols;
        float *d = dst + r * k;
        for (int64_t c0 = 0; c0 < k; c0 += bk) {
            const int64_t c1 = c0 + bk < k ? c0 + bk : k;
            const float sc = srow[c0 / bk];
            int64_t i = c0;
#ifdef MM_AVX2
            const vf s8 = vset1(sc * 256.f);  /* vwiden_e4m3 gives 2^-8 times each weight */
            const char *next = (const char *)(q + NB * k);  /* this row of the next block */
            for (; i + VW <= c1; i += VW) {
                if (!(i & 63)) _mm_prefetch(next + i, _MM_HINT_T1);
                vstore(d + i, vmul(vwiden_e4m3(q + i), s8));
            }
#endif
            for (; i < c1; i++) d[i] = e4m3_to_f32(q[i]) * sc;
        }
    }
}

#ifdef MM_AVX2
/* One x row against NB e4m3 weight rows w (row length k) sharing one row of block scales `scale`: each weight
 * dequantized in registers (the bits dequant_rows stores) and summed in row_dot_rows' order, so the result is
 * the fp32 twin's; one row reuses no weight, and a pass through scratch would cost what the read saves. */
static void row_dot_rows_e4m3(const float *x, const uint8_t *w, const float *scale, int64_t bk, int64_t k,
                              float *out) {
    vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
    const uint8_t *next = w + NB * k;
    vf s = vzero();
    int64_t i = 0;
    for (int64_t edge = 0; i + VW <= k; i += VW) {  /* bk % VW == 0: no vector step straddles two scales */
        if (i == edge) {
            s = vset1(scale[i / bk] * 256.f);  /* vwiden_e4m3 gives 2^-8 times each weight */
            edge += bk;
        }
        if (!(i & 63))
            for (int r = 0; r < NB; r++) _mm_prefetch((const char *)next + r * k + i, _MM_HINT_T1);
        vf xv = vload(x + i);
        a0 = vfma(xv, vmul(vwiden_e4m3(w + i), s), a0);
        a1 = vfma(xv, vmul(vwiden_e4m3(w + k + i), s), a1);
        a2 = vfma(xv, vmul(vwiden_e4m3(w + 2 * k + i), s), a2);
        a3 = vfma(xv, vmul(vwiden_e4m3(w + 3 * k + i), s), a3);
    }
    float acc[NB] = {vsum(a0), vsum(a1), vsum(a2), vsum(a3)};
    for (; i < k; i++) {  /* row_dot_rows' scalar tail, after the vector lanes */
        const float sc = scale[i / bk];
        for (int r = 0; r < NB; r++) acc[r] += x[i] * (e4m3_to_f32(w[r * k + i]) * sc);
    }
    for (int r = 0; r < NB; r++) out[r] = acc[r];
}
#endif

void cpu_fp8_block_product(const float *x, int64_t ldx, int64_t m, const uint8_t *w, const float *scale,
                           const fp8_scales *q, int64_t n0, int nb, int64_t k, float *scratch, float *out,
                           int64_t ldo) {
    const int64_t cols = (k + q->bk - 1) / q->bk;
#ifdef MM_AVX2
    if (m == 1 && nb == NB && q->bk % VW == 0 && q->bn % NB == 0 && n0 % NB == 0) {
        row_dot_rows_e4m3(x, w + n0 * k, scale + (n0 / q->bn) * cols, q->bk, k, out);
        return;
    }
#endif
    dequant_rows(w, scale, cols, q->bn, q->bk, n0, nb, k, scratch);
    cpu_block_product(x, ldx, m, scratch, W_F32, 0, nb, k, out, ldo);
}

/* rows x cols e4m3 weights with their bn x bk scales -> fp32 out: the kernel's own dequantization, exposed so
 * that tests hold it to moemesh.model.checkpoint.dequantize_fp8_blockwise bit for bit. */
void mm_dequant_fp8(const uint8_t *w, const float *scale, int64_t rows, int64_t cols, int64_t bn, int64_t bk,
                    float *out) {
    for (int64_t n0 = 0; n0 < rows; n0 += NB) {
        const int nb = (int)(rows - n0 < NB ? rows - n0 : NB);
        dequant_rows(w, scale, (cols + bk - 1) / bk, bn, bk, n0, nb, cols, out + n0 * cols);
    }
}

