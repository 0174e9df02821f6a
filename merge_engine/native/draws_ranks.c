/* evomerge native kernels for the seeded draws of DARE/DELLA and DELLA's per-row magnitude ranks
 * (see merge_engine/native/draws.py). Same bits as the torch reference, tested:
 *
 * mt_uniform_f32 / mt_keep_u8: torch's CPU generator is MT19937 seeded with the low 32 bits of the
 *   seed; torch.rand(float32) takes each 32-bit output r as (r & (2^24 - 1)) * 2^-24. The keep mask
 *   is u < keep with keep rounded to float32, as `torch.rand(...) < keep` compares.
 * row_rank_probs_bf16: per row, a stable LSD radix sort (8 + 7 bits) of |delta|'s magnitude bits
 *   (ties by position, as torch.argsort(stable=True)), the rank r mapped by the caller's table
 *   probs[r]. Rows holding a NaN are reported (the caller then uses the torch reference).
 *   Rows whose nonzero magnitudes span few keys (real deltas: a few exponents) are ranked by
 *   counting every 15-bit key instead (count_row: two passes over the row, no scatter).
 * row_rank_keep_seeded_bf16: the same ranks, then DELLA's keep mask u < table[rank] straight away
 *   (no float32 probabilities written and compared in a second pass, no permutation array: each
 *   rank is used where the radix pass assigns it), with the draws u made row by row inside
 *   (mt_uniform_f32's numbers, the generator skipped ahead to the first row): no tensor of draws.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MT_N 624
#define MT_M 397

typedef struct { uint32_t s[MT_N]; int i; } mt_t;

static void mt_seed(mt_t *m, uint32_t seed) {
    m->s[0] = seed;
    for (int i = 1; i < MT_N; i++) m->s[i] = 1812433253u * (m->s[i - 1] ^ (m->s[i - 1] >> 30)) + (uint32_t)i;
    m->i = MT_N;
}

#define MT_MIX(a, b, c) ((c) ^ ((((a) & 0x80000000u) | ((b) & 0x7FFFFFFFu)) >> 1) ^ (-((b) & 1u) & 0x9908B0DFu))

/* the standard twist, split so that no index wraps (vectorizes) */
static void mt_twist(mt_t *m) {
    uint32_t *s = m->s;
    int i = 0;
    for (; i < MT_N - MT_M; i++) s[i] = MT_MIX(s[i], s[i + 1], s[i + MT_M]);
    for (; i < MT_N - 1; i++) s[i] = MT_MIX(s[i], s[i + 1], s[i + MT_M - MT_N]);
    s[MT_N - 1] = MT_MIX(s[MT_N - 1], s[0], s[MT_M - 1]);
    m->i = 0;
}

/* the stream's next n 32-bit outputs into out, a tempered state (624 values) at a time */
static void mt_fill(uint32_t *out, mt_t *m, long n) {
    for (long done = 0; done < n;) {
        if (m->i == MT_N) mt_twist(m);
        const long take = MT_N - m->i < n - done ? MT_N - m->i : n - done;
        for (long i = 0; i < take; i++) {
            uint32_t y = m->s[m->i + i];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9D2C5680u;
            y ^= (y << 15) & 0xEFC60000u;
            out[done + i] = y ^ (y >> 18);
        }
        m->i += (int)take;
        done += take;
    }
}

/* outputs to float32 U[0, 1) in place, as torch.rand: 24 random bits times 2^-24 (exact) */
static void unit_floats(float *out, long n) {
    const uint32_t *bits = (const uint32_t *)out;
    for (long i = 0; i < n; i++) out[i] = (float)(bits[i] & 0xFFFFFFu) * (1.0f / 16777216.0f);
}

/* the next n outputs skipped: a twist per 624, no tempering */
static void mt_skip(mt_t *m, long n) {
    while (n > 0) {
        if (m->i == MT_N) mt_twist(m);
        const long take = MT_N - m->i < n ? MT_N - m->i : n;
        m->i += (int)take;
        n -= take;
    }
}

/* float32 U[0, 1) as torch.rand */
void mt_uniform_f32(float *out, uint64_t seed, long n) {
    mt_t m;
    mt_seed(&m, (uint32_t)seed);
    mt_fill((uint32_t *)out, &m, n);
    unit_floats(out, n);
}

/* u < keep with keep rounded to float32, as torch compares a float32 tensor with a Python float */
void mt_keep_u8(uint8_t *out, uint64_t seed, float keep, long n) {
    mt_t m;
    uint32_t buf[MT_N];
    mt_seed(&m, (uint32_t)seed);
    for (long s = 0; s < n; s += MT_N) {
        const long e = n - s < MT_N ? n - s : MT_N;
        mt_fill(buf, &m, e);
        for (long i = 0; i < e; i++)
            out[s + i] = (float)(buf[i] & 0xFFFFFFu) * (1.0f / 16777216.0f) < keep;
    }
}

/* The rank of each column of row d in a stable ascending sort by magnitude bits (an LSD radix
 * sort, 8 then 7 bits, through tmp), handed straight to its output: probs[c] = table[rank] (keep
 * NULL) or keep[c] = u[c] < table[rank]; no permutation is written and read back. The counts use
 * four interleaved sub-histograms (a row's magnitudes share few exponents: one counter would
 * serialize). Returns 1 (outputs unset) when the row holds a NaN. */
#define WAYS 4
static inline void emit(float *probs, uint8_t *keep, const float *u, const float *table, uint32_t c,
                        uint32_t rank) {
    if (keep) keep[c] = u[c] < table[rank];
    else probs[c] = table[rank];
}

/* The counting path: a row's nonzero magnitudes span few exponents (a few thousand keys at most on
 * real deltas), so one counter per key over [smallest nonzero key, largest key], zeros in a slot
 * of their own below, gives every rank in two passes over the row (count, then rank in column
 * order: stable) with no scatter through tmp. Returns -1 when the key span is too wide for the row
 * (the radix path then ranks), 1 on a NaN, else 0. */
#define SPAN_MAX (1L << 15)
static int count_row(uint32_t *cnt, const uint16_t *d, long cols, const float *table, float *probs,
                     uint8_t *keep, const float *u) {
    unsigned lo = 0xFFFF, hi = 0;
    for (long c = 0; c < cols; c++) {
        const unsigned k = d[c] & 0x7FFF;
        hi = k > hi ? k : hi;
        const unsigned m = k ? k : 0xFFFF;
        lo = m < lo ? m : lo;
    }
    if (hi > 0x7F80) return 1;  /* a NaN */
    const unsigned base = hi >= lo ? lo - 1 : 0;  /* key k > 0 counts in slot k - base >= 1 */
    const long span = hi >= lo ? (long)(hi - base) + 1 : 1;
    if (span > 2 * cols + 256) return -1;
    memset(cnt, 0, sizeof(uint32_t) * span);
    for (long c = 0; c < cols; c++) {
        const unsigned k = d[c] & 0x7FFF;
        cnt[k ? k - base : 0]++;
    }
    uint32_t sum = 0;
    for (long b = 0; b < span; b++) {
        const uint32_t n = cnt[b];
        cnt[b] = sum;
        sum += n;
    }
    for (long c = 0; c < cols; c++) {
        const unsigned k = d[c] & 0x7FFF;
        emit(probs, keep, u, table, (uint32_t)c, cnt[k ? k - base : 0]++);
    }
    return 0;
}

static int rank_row(uint32_t *tmp, const uint16_t *d, long cols, const float *table, float *probs,
                    uint8_t *keep, const float *u) {
    const int counted = count_row(tmp + cols, d, cols, table, probs, keep, u);
    if (counted >= 0) return counted;
    uint32_t lo[WAYS][256], hi[WAYS][128];
    memset(lo, 0, sizeof lo);
    memset(hi, 0, sizeof hi);
    unsigned worst = 0;
    long c = 0;
    for (; c + WAYS <= cols; c += WAYS)
        for (int j = 0; j < WAYS; j++) {
            const unsigned k = d[c + j] & 0x7FFF;
            worst = k > worst ? k : worst;
            lo[j][k & 0xFF]++;
            hi[j][k >> 8]++;
        }
    for (; c < cols; c++) {
        const unsigned k = d[c] & 0x7FFF;
        worst = k > worst ? k : worst;
        lo[0][k & 0xFF]++;
        hi[0][k >> 8]++;
    }
    if (worst > 0x7F80) return 1;  /* a NaN */
    uint32_t sum = 0;
    for (int b = 0; b < 256; b++) {
        const uint32_t n = lo[0][b] + lo[1][b] + lo[2][b] + lo[3][b];
        lo[0][b] = sum;
        sum += n;
    }
    sum = 0;
    for (int b = 0; b < 128; b++) {
        const uint32_t n = hi[0][b] + hi[1][b] + hi[2][b] + hi[3][b];
        hi[0][b] = sum;
        sum += n;
    }
    uint32_t *lo_at = lo[0], *hi_at = hi[0];
    if (cols <= (1L << 17)) {  /* key and column packed in one word: the second pass reads no row */
        for (long i = 0; i < cols; i++) {
            const uint32_t k = d[i] & 0x7FFF;
            tmp[lo_at[k & 0xFF]++] = (k << 17) | (uint32_t)i;
        }
        for (long r = 0; r < cols; r++) {
            const uint32_t v = tmp[r];
            emit(probs, keep, u, table, v & 0x1FFFFu, hi_at[v >> 25]++);
        }
        return 0;
    }
    for (long i = 0; i < cols; i++) tmp[lo_at[d[i] & 0xFF]++] = (uint32_t)i;
    for (long r = 0; r < cols; r++) {
        const uint32_t i = tmp[r];
        emit(probs, keep, u, table, i, hi_at[(d[i] & 0x7FFF) >> 8]++);
    }
    return 0;
}

#define ROW_BUFFER(cols) (sizeof(uint32_t) * ((cols) + ((cols) < SPAN_MAX ? 2 * (cols) + 256 : SPAN_MAX)))  /* + counters */

/* probs[row, c] = table[rank of |delta[row, c]| in its row]; returns the number of rows with a
 * NaN (their outputs are left unset) or -1 when out of memory */
long row_rank_probs_bf16(float *probs, const uint16_t *delta, const float *table, long cols,
                         long row_start, long row_stop) {
    uint32_t *tmp = malloc(ROW_BUFFER(cols));
    long nan_rows = 0;
    if (tmp == NULL) return -1;
    for (long row = row_start; row < row_stop; row++) {
        const long at = row * cols;
        if (rank_row(tmp, delta + at, cols, table, probs + at, 0, 0)) nan_rows++;
    }
    free(tmp);
    return nan_rows;
}

/* keep[row, c] = u[row, c] < table[rank of |delta[row, c]| in its row] (DELLA's Bernoulli draw,
 * torch's float32 `u < probs`), u[row, c] being draw number row * cols + c of
 * mt_uniform_f32(seed), made one row at a time into a small buffer (the generator skipped to
 * row_start first): no float32 tensor of draws is written and read back. Returns the number of
 * rows with a NaN (their outputs are left unset) or -1 when out of memory */
long row_rank_keep_seeded_bf16(uint8_t *keep, uint64_t seed, const uint16_t *delta,
                               const float *table, long cols, long row_start, long row_stop) {
    mt_t *m = malloc(sizeof(mt_t));
    float *u = malloc(sizeof(float) * cols);
    uint32_t *tmp = malloc(ROW_BUFFER(cols));
    long nan_rows = 0;
    if (m == NULL || u == NULL || tmp == NULL) {
        free(m), free(u), free(tmp);
        return -1;
    }
    mt_seed(m, (uint32_t)seed);
    mt_skip(m, row_start * cols);
    for (long row = row_start; row < row_stop; row++) {
        mt_fill((uint32_t *)u, m, cols);
        unit_floats(u, cols);
        const long at = row * cols;
        if (rank_row(tmp, delta + at, cols, table, 0, keep + at, u)) nan_rows++;
    }
    free(m), free(u), free(tmp);
    return nan_rows;
}
