/* evomerge native kernel: a weighted sum of bfloat16 tensors in one pass.
 *
 * out[i] = bf16( (fma(x[n-1][i], w[n-1], ... fma(x[0][i], w[0], 0.0f))) [/ divisor] )
 *
 * The same float32 arithmetic as the torch path in merge_engine/methods/linear.py (exact
 * widening, one fused multiply-add per model in model order, an IEEE division, round to
 * nearest even; NaN becomes 0x7FC0 as in c10::BFloat16), so the bits are the same; the tests
 * compare both paths. Plain C with no fast-math: every operation is correctly rounded, whatever
 * the instruction set. Work is done in chunks that stay in the L1 cache.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define CHUNK 2048

void weighted_sum_bf16(uint16_t *out, const uint16_t *const *ins, const float *weights, int n_in,
                       long start, long stop, float divisor, int divide) {
    float acc[CHUNK];
    for (long s = start; s < stop; s += CHUNK) {
        long m = stop - s < CHUNK ? stop - s : CHUNK;
        for (long i = 0; i < m; i++) acc[i] = 0.0f;
        for (int k = 0; k < n_in; k++) {
            const uint16_t *x = ins[k] + s;
            const float w = weights[k];
            for (long i = 0; i < m; i++) acc[i] = fmaf(bf(x[i]), w, acc[i]);
        }
        if (divide)
            for (long i = 0; i < m; i++) acc[i] = acc[i] / divisor;
        uint16_t *o = out + s;
        for (long i = 0; i < m; i++) o[i] = rbf(acc[i]);
    }
}
