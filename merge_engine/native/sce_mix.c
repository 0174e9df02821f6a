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

#define MAX_MODELS 64

static inline float bf(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t rbf(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : rounded;
}

void var_bf16(uint16_t *out, const uint16_t *const *deltas, int n, long start, long stop) {
    for (long i = start; i < stop; i++) {
        double mean = 0.0, m2 = 0.0;
        for (int k = 0; k < n; k++) {
            const double x = bf(deltas[k][i]);
            const double delta = x - mean;
            mean = mean + delta / (double)(k + 1);
            m2 = m2 + delta * (x - mean);
        }
        out[i] = rbf((float)(m2 / (double)n));
    }
}

/* keep entries whose variance bits (k, i) are k > lo or k == lo and i <= lo_cut; select == 0: all */
void sce_mix_bf16(uint16_t *out, const uint16_t *base, const uint16_t *const *deltas, int n,
                  const uint16_t *var, int select, int lo, long lo_cut, const float *w,
                  long start, long stop) {
    float v[MAX_MODELS];
    for (long i = start; i < stop; i++) {
        int keep = 1;
        if (select) {
            const int key = var[i] & 0x7FFF;
            keep = key > lo || (key == lo && i <= lo_cut);
        }
        float sum = 0.0f;
        for (int k = 0; k < n; k++) {
            const float x = bf(deltas[k][i]);
            v[k] = keep ? x : bf(rbf(x * 0.0f));
            sum += v[k];
        }
        const float s = bf(rbf(sum));
        const float major = s >= 0.0f ? 1.0f : -1.0f;
        float mixed = 0.0f, div = 0.0f;
        for (int k = 0; k < n; k++) {
            const float sign = v[k] > 0.0f ? 1.0f : v[k] < 0.0f ? -1.0f : v[k] == 0.0f ? 0.0f : v[k];
            const float we = sign == major ? w[k] : 0.0f;
            mixed += bf(rbf(v[k] * we));
            div += we;
        }
        float d = bf(rbf(div));
        d = d == 0.0f ? 1.0f : d;
        const float q = bf(rbf(bf(rbf(mixed)) / d));
        out[i] = rbf(bf(base[i]) + q);
    }
}
