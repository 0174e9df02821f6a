/* evomerge native kernels for the norms of the task-arithmetic family (see merge_engine/native/l1.py).
 *
 * chunk_sums_bf16: the first level of merge_engine.methods._reduce.total over f(kept(d)): the sum of
 *   every 1024-entry chunk (the last one padded with +0.0), each added in the order torch's
 *   contiguous inner sum adds a row of 1024 float32 values on a CPU whose vectors hold `lanes`
 *   floats (8: AVX2, 16: AVX512): four interleaved vector accumulators ("ilp"), cascaded every
 *   16 rows into a second level, folded 0+1+2+3, then the lanes added one by one from 0.0f.
 *   kept(d) is d where the entry is kept and d * 0.0f where it is not (the bits of bf16 * bool);
 *   an entry is kept when mask is NULL or mask[i] != 0, and, when var is not NULL, when var's
 *   bits k (as int16) satisfy k > lo or k == lo and i <= lo_cut (SCE's top-k of the variance).
 *   f is |x| (square == 0) or x * x (square == 1), in float32.
 * mask_scale_bf16: bf16(float(kept(d)) * scale) (scale only when do_scale), torch's rounding of
 *   `(delta * mask) * scale` for a float32 scalar.
 * Plain C, no fast-math, no contraction: every float operation is one rounded IEEE operation.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

#define CHUNK 1024
#define ILP 4
#define LEVELS 4
#define LEVEL_STEP 16 /* 1 << max(4, ceil(log2(rows)) / 4) for the 16 or 32 rows of a 1024 chunk */
#define MAX_LANES 16

static inline float value(const uint16_t *d, const uint8_t *mask, const uint16_t *var, int lo,
                          long lo_cut, int square, long i) {
    float v = bf(d[i]);
    int keep = mask == 0 || mask[i];
    if (var) {
        int k = (int16_t)var[i];  /* signed, as torch compares var.view(torch.int16) */
        keep = keep && (k > lo || (k == lo && i <= lo_cut));
    }
    if (!keep) v = v * 0.0f;
    return square ? v * v : fabsf(v);
}

/* one 1024-entry chunk's sum in torch's order for `lanes` float lanes (see the header) */
static inline float chunk_sum(const float *x, const int lanes) {
    const long rows = CHUNK / lanes / ILP;
    float acc[LEVELS][ILP][MAX_LANES] = {{{0}}};
    long r = 0;
    while (r + LEVEL_STEP <= rows) {
        for (long j = 0; j < LEVEL_STEP; j++, r++)
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < lanes; l++) acc[0][k][l] += x[(r * ILP + k) * lanes + l];
        for (int lv = 1; lv < LEVELS; lv++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < lanes; l++) {
                    acc[lv][k][l] += acc[lv - 1][k][l];
                    acc[lv - 1][k][l] = 0.0f;
                }
            if ((r & ((long)(LEVEL_STEP - 1) << (4 * lv))) != 0) break;
        }
    }
    for (; r < rows; r++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < lanes; l++) acc[0][k][l] += x[(r * ILP + k) * lanes + l];
    for (int lv = 1; lv < LEVELS; lv++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < lanes; l++) acc[0][k][l] += acc[lv][k][l];
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < lanes; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int l = 0; l < lanes; l++) total += acc[0][0][l];
    return total;
}

void chunk_sums_bf16(float *out, const uint16_t *d, long n, const uint8_t *mask, const uint16_t *var,
                     int lo, long lo_cut, int square, int lanes, long c0, long c1) {
    for (long c = c0; c < c1; c++) {
        float x[CHUNK];
        const long s = c * CHUNK, m = n - s < CHUNK ? n - s : CHUNK;
        if (mask == 0 && var == 0 && !square) {  /* the common |delta| case, branch-free */
            for (long j = 0; j < m; j++) x[j] = fabsf(bf(d[s + j]));
        } else {
            for (long j = 0; j < m; j++) x[j] = value(d, mask, var, lo, lo_cut, square, s + j);
        }
        for (long j = m; j < CHUNK; j++) x[j] = 0.0f;
        /* a constant width lets the compiler keep each level's accumulators in vector registers */
        out[c] = lanes == 8 ? chunk_sum(x, 8) : chunk_sum(x, lanes);
    }
}

void mask_scale_bf16(uint16_t *out, const uint16_t *d, const uint8_t *mask, float scale, int do_scale,
                     long start, long stop) {
    for (long i = start; i < stop; i++) {
        float v = bf(d[i]);
        if (mask && !mask[i]) v = v * 0.0f;
        out[i] = rbf(do_scale ? v * scale : v);
    }
}

/* how many entries of [start, stop) are NaN or +-inf (exponent bits all ones) */
long count_nonfinite_bf16(const uint16_t *d, long start, long stop) {
    long c = 0;
    for (long i = start; i < stop; i++) c += (d[i] & 0x7F80) == 0x7F80;
    return c;
}
