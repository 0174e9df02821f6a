/* bfloat16 <-> float for the evomerge kernels: exact widening, and rounding to nearest even with
 * every NaN rounded to 0x7FC0 (what torch's scalar conversion gives). */
#ifndef EVOMERGE_BF16_H
#define EVOMERGE_BF16_H
#include <stdint.h>
#include <string.h>

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
#endif
