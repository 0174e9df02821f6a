/* evomerge native kernels for the task-arithmetic family on bfloat16 (see merge_engine/native/sparse.py).
 *
 * delta_hist_bf16: delta = bf16(x - base) and a histogram of |delta|'s 15 magnitude bits, which rank
 *   like the magnitudes, so any top-k threshold is read from the histogram without sorting.
 * count_key_bf16 / nth_key_bf16: where the entries of one magnitude lie in flat order (ties are
 *   broken by position, as a stable sort does).
 * sparse_mix_bf16: per entry, each model's delta is kept or zeroed by its selection (a rank
 *   interval in the (magnitude, position) order), weighted, sign-elected and mixed onto the base,
 *   in one pass with no temporaries: the float32 operations and bf16 roundings of the torch path
 *   in merge_engine/sparsify.py (_mix) in the same order, so the bits are the same (tested).
 * Plain C, no fast-math, no contraction of a*b+c (every step of the torch path is rounded).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define KEYS 32768
#define CHUNK 1024
/* the mix's block: its dozen float arrays of a block (models' weighted deltas, sums, signs,
 * divisors) stay in L1 with the input streams; 1024 spilled (1.3-1.5x slower on 2 cores) */
#define MIX_CHUNK 256
#define MAX_MODELS 64

enum { KEEP_ALL = 0, KEEP_ZERO = 1, KEEP_TOP = 2, KEEP_BAND = 3 };

/* four interleaved sub-histograms: runs of equal magnitudes would otherwise serialize on one
 * counter; uint32 counts per call range (callers split ranges well below 2^32 entries) */
#define HIST_WAYS 4
static void fold(int64_t *hist, uint32_t (*sub)[KEYS]) {
    for (int k = 0; k < KEYS; k++) hist[k] += (int64_t)sub[0][k] + sub[1][k] + sub[2][k] + sub[3][k];
}

static void count(uint32_t (*sub)[KEYS], const uint16_t *delta, long start, long stop) {
    long i = start;
    for (; i + HIST_WAYS <= stop; i += HIST_WAYS)
        for (int j = 0; j < HIST_WAYS; j++) sub[j][delta[i + j] & 0x7FFF]++;
    for (; i < stop; i++) sub[0][delta[i] & 0x7FFF]++;
}

void delta_hist_bf16(uint16_t *delta, int64_t *hist, const uint16_t *x, const uint16_t *base,
                     long start, long stop) {
    static _Thread_local uint32_t sub[HIST_WAYS][KEYS];
    memset(sub, 0, sizeof sub);
    for (long s = start; s < stop; s += CHUNK) {  /* a vectorized pass, then counting in L1 */
        long e = stop - s < CHUNK ? stop : s + CHUNK;
        for (long i = s; i < e; i++) delta[i] = rbf(bf(x[i]) - bf(base[i]));
        count(sub, delta, s, e);
    }
    fold(hist, sub);
}

/* delta = bf16(x - base) alone, for the methods that read no histogram (DARE, DELLA, SCE) */
void delta_bf16(uint16_t *delta, const uint16_t *x, const uint16_t *base, long start, long stop) {
    for (long i = start; i < stop; i++) delta[i] = rbf(bf(x[i]) - bf(base[i]));
}

void hist_bf16(int64_t *hist, const uint16_t *delta, long start, long stop) {
    static _Thread_local uint32_t sub[HIST_WAYS][KEYS];
    memset(sub, 0, sizeof sub);
    count(sub, delta, start, stop);
    fold(hist, sub);
}

long count_key_bf16(const uint16_t *d, long start, long stop, int key) {
    long c = 0;
    for (long i = start; i < stop; i++) c += (d[i] & 0x7FFF) == key;
    return c;
}

/* index of the nth (1-based) entry of magnitude key in [start, stop), or -1 */
long nth_key_bf16(const uint16_t *d, long start, long stop, int key, long nth) {
    for (long i = start; i < stop; i++)
        if ((d[i] & 0x7FFF) == key && --nth == 0) return i;
    return -1;
}

/* is entry i (magnitude bits k) kept: TOP keeps (k, i) with k > lo or k == lo and i <= lo_cut;
 * BAND keeps lo <= k <= hi with i >= lo_cut where k == lo and i <= hi_cut where k == hi */
static inline int kept(int mode, int k, long i, int lo, long lo_cut, int hi, long hi_cut) {
    if (mode == KEEP_TOP) return k > lo || (k == lo && i <= lo_cut);
    return (k > lo || (k == lo && i >= lo_cut)) && (k < hi || (k == hi && i <= hi_cut));
}

/* the trimmed delta, as bf16(delta * mask) */
void select_bf16(uint16_t *out, const uint16_t *d, int mode, int lo, long lo_cut, int hi,
                 long hi_cut, long start, long stop) {
    for (long i = start; i < stop; i++) {
        float v = bf(d[i]);
        out[i] = rbf(kept(mode, d[i] & 0x7FFF, i, lo, lo_cut, hi, hi_cut) ? v * 1.0f : v * 0.0f);
    }
}

void sparse_mix_bf16(uint16_t *out, const uint16_t *base, const uint16_t *const *deltas, int n,
                     const int *mode, const int *lo, const long *lo_cut, const int *hi,
                     const long *hi_cut, const float *w, int elect, int normalize, float divisor,
                     int scale, float lambda, long start, long stop) {
    float wt[MAX_MODELS][MIX_CHUNK], acc[4][MIX_CHUNK];
    for (long s = start; s < stop; s += MIX_CHUNK) {
        long m = stop - s < MIX_CHUNK ? stop - s : MIX_CHUNK;
        for (int k = 0; k < n; k++) {
            const uint16_t *d = deltas[k] + s;
            float *o = wt[k];
            const float wk = w[k];
            /* bf16(bf16(v * mask) * w) == bf16((mask ? v : v * 0) * w): v * 1 and v * 0 are exact
             * in bf16 (a NaN stays NaN and is rounded to 0x7FC0 after the weighting either way) */
            if (mode[k] == KEEP_ALL) {
                for (long i = 0; i < m; i++) o[i] = bf(rbf(bf(d[i]) * wk));
                continue;
            }
            if (mode[k] == KEEP_ZERO) {
                for (long i = 0; i < m; i++) o[i] = bf(rbf(0.0f * wk));
                continue;
            }
            const int l = lo[k], h = hi[k], band = mode[k] == KEEP_BAND;
            const long lc = lo_cut[k], hc = hi_cut[k], last = s + m - 1;
            /* the tie rule depends on the position only in the chunk holding a cut */
            int tie_lo, tie_hi = 1;
            if (band) {
                tie_lo = lc <= s ? 1 : lc > last ? 0 : -1;
                tie_hi = hc >= last ? 1 : hc < s ? 0 : -1;
            } else {
                tie_lo = lc >= last ? 1 : lc < s ? 0 : -1;
            }
            if (tie_lo < 0 || tie_hi < 0) {
                for (long i = 0; i < m; i++) {
                    float v = bf(d[i]);
                    v = kept(mode[k], d[i] & 0x7FFF, s + i, l, lc, h, hc) ? v : v * 0.0f;
                    o[i] = bf(rbf(v * wk));
                }
            } else if (band) {
                for (long i = 0; i < m; i++) {
                    const int key = d[i] & 0x7FFF;
                    const int keep = ((key > l) | ((key == l) & tie_lo)) & ((key < h) | ((key == h) & tie_hi));
                    const float v = bf(d[i]);
                    o[i] = bf(rbf((keep ? v : v * 0.0f) * wk));
                }
            } else {
                for (long i = 0; i < m; i++) {
                    const int key = d[i] & 0x7FFF;
                    const int keep = (key > l) | ((key == l) & tie_lo);
                    const float v = bf(d[i]);
                    o[i] = bf(rbf((keep ? v : v * 0.0f) * wk));
                }
            }
        }
        /* column by column over the chunk, so that every loop below vectorizes */
        const uint16_t *b = base + s;
        uint16_t *res = out + s;
        float *mixed = acc[0];
        if (elect) {
            float *sign = acc[1], *sum = acc[2], *div = acc[3];
            for (long i = 0; i < m; i++) mixed[i] = 0.0f;
            for (int k = 0; k < n; k++)
                for (long i = 0; i < m; i++) mixed[i] += wt[k][i];
            for (long i = 0; i < m; i++) {
                sign[i] = (rbf(mixed[i]) & 0x8000) ? -1.0f : 1.0f;
                sum[i] = 0.0f;
                div[i] = 0.0f;
            }
            for (int k = 0; k < n; k++) {
                const float wk = w[k];
                for (long i = 0; i < m; i++) {
                    float a = bf(rbf(wt[k][i] * sign[i]));
                    a = (a >= 0.0f || a != a) ? a : 0.0f; /* clamp(min=0); NaN passes */
                    sum[i] += a;
                    div[i] += a > 0.0f ? wk : (a == a ? 0.0f : a);
                }
            }
            for (long i = 0; i < m; i++) {
                float v = bf(rbf(bf(rbf(sum[i])) * sign[i]));
                if (normalize) {
                    float dv = bf(rbf(div[i]));
                    dv = dv == 0.0f ? 1.0f : dv;
                    v = bf(rbf(v / dv));
                }
                mixed[i] = v;
            }
        } else {
            for (long i = 0; i < m; i++) mixed[i] = 0.0f;
            for (int k = 0; k < n; k++)
                for (long i = 0; i < m; i++) mixed[i] += wt[k][i];
            for (long i = 0; i < m; i++) {
                float v = bf(rbf(mixed[i]));
                mixed[i] = normalize ? bf(rbf(v / divisor)) : v;
            }
        }
        for (long i = 0; i < m; i++) {
            float v = scale ? bf(rbf(mixed[i] * lambda)) : mixed[i];
            res[i] = rbf(bf(b[i]) + v);
        }
    }
}
