/* evomerge native kernels for SCE on bfloat16 (see merge_engine/native/sparse.py and
 * merge_engine/methods/sce.py, the torch reference; same bits, tested).
 *
 * var_bf16: the population variance across models of each entry, as torch's CPU var(dim=0,
 *   unbiased=False) of a bf16 stack computes it: Welford in double, then float, then bf16.
 * sce_mix_bf16: per entry, each delta masked by the variance selection (a rank interval of the
 *   variance's bits, as sparse_mix_bf16's TOP selection), the sign elected from the bf16 sum of
 *   the masked deltas (ties and -0.0 to +1, NaN to -1), agreeing models weighted by their shares
 *   and the weighted mean added to the base: every bf16 rounding of the torch path, in order.
 * Plain C, no fast-math, no contraction of a*b+c.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_MODELS 64

/* chunk by chunk, model by model, so that the divisions run as vectors (the same operations on
 * every entry in the same order: the same bits as one entry at a time) */
#define VAR_CHUNK 512
void var_bf16(uint16_t *out, const uint16_t *const *deltas, int n, long start, long stop) {
    double mean[VAR_CHUNK], m2[VAR_CHUNK];
    for (long s = start; s < stop; s += VAR_CHUNK) {
        const long m = stop - s < VAR_CHUNK ? stop - s : VAR_CHUNK;
        for (long i = 0; i < m; i++) mean[i] = m2[i] = 0.0;
        for (int k = 0; k < n; k++) {
            const uint16_t *d = deltas[k] + s;
            const double count = (double)(k + 1);
            if (((k + 1) & k) == 0) {  /* count 2^j: delta * 2^-j is delta / count, rounding and all */
                const double inv = 1.0 / count;
                for (long i = 0; i < m; i++) {
                    const double x = bf(d[i]);
                    const double delta = x - mean[i];
                    mean[i] = mean[i] + delta * inv;
                    m2[i] = m2[i] + delta * (x - mean[i]);
                }
                continue;
            }
            for (long i = 0; i < m; i++) {
                const double x = bf(d[i]);
                const double delta = x - mean[i];
                mean[i] = mean[i] + delta / count;
                m2[i] = m2[i] + delta * (x - mean[i]);
            }
        }
        for (long i = 0; i < m; i++) out[s + i] = rbf((float)(m2[i] / (double)n));
    }
}

/* keep entries whose variance bits (k, i) are k > lo or k == lo and i <= lo_cut; select == 0: all.
 * Chunk by chunk, model by model, so that the loops vectorize; a dropped entry is x * 0 (a NaN
 * stays NaN: its payload never reaches the result, which rounds every NaN to 0x7FC0). */
#define CHUNK 256 /* its float arrays of a chunk stay in L1 with the input streams (as sparse_mix's) */
void sce_mix_bf16(uint16_t *out, const uint16_t *base, const uint16_t *const *deltas, int n,
                  const uint16_t *var, int select, int lo, long lo_cut, const float *w,
                  long start, long stop) {
    float v[MAX_MODELS][CHUNK], sum[CHUNK], major[CHUNK], mixed[CHUNK], div[CHUNK];
    float keep[CHUNK];
    for (long s = start; s < stop; s += CHUNK) {
        const long m = stop - s < CHUNK ? stop - s : CHUNK;
        for (long i = 0; i < m; i++) {
            const int key = select ? var[s + i] & 0x7FFF : 0;
            keep[i] = !select || key > lo || (key == lo && s + i <= lo_cut) ? 1.0f : 0.0f;
            sum[i] = mixed[i] = div[i] = 0.0f;
        }
        for (int k = 0; k < n; k++) {
            const uint16_t *d = deltas[k] + s;
            for (long i = 0; i < m; i++) {
                const float x = bf(d[i]);
                v[k][i] = keep[i] != 0.0f ? x : x * 0.0f;
                sum[i] += v[k][i];
            }
        }
        for (long i = 0; i < m; i++) major[i] = bf(rbf(sum[i])) >= 0.0f ? 1.0f : -1.0f;
        for (int k = 0; k < n; k++) {
            const float wk = w[k];
            for (long i = 0; i < m; i++) {
                const float x = v[k][i];
                /* w * (sign(x) == major), as torch multiplies the bf16 shares by the bool agreement
                 * (a NaN share stays NaN); zeros and NaN never agree */
                const float we = wk * (x * major[i] > 0.0f ? 1.0f : 0.0f);
                mixed[i] += bf(rbf(x * we));
                div[i] += we;
            }
        }
        for (long i = 0; i < m; i++) {
            float d = bf(rbf(div[i]));
            d = d == 0.0f ? 1.0f : d;
            const float q = bf(rbf(bf(rbf(mixed[i])) / d));
            out[s + i] = rbf(bf(base[s + i]) + q);
        }
    }
}
