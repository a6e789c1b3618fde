/* The inner loops of paged attention over one kv tile: scores, online softmax, P @ V.
 * Rows are query rows of one kv head, tokens the tile's kv tokens (KV_TILE at most). */
#ifndef FLEETLM_ONLINE_SOFTMAX_H
#define FLEETLM_ONLINE_SOFTMAX_H

#include <math.h>

#include "vector.h"

#define KV_TILE 32    /* kv tokens per online-softmax step */
#define ROW_GROUP 4   /* query rows that share each K/V vector load */
#define DIM_CHUNK 16  /* head_dim slice (two vectors) held in registers during P @ V */

/* s[r][t] = q[r] . k[t] for num_rows (<= ROW_GROUP) rows, two tokens at a time; prefetches
 * the next_k rows along unless elem (the cache's bytes per element) is 0. */
static ALWAYS_INLINE void score_rows(const float *q, int64_t dim, const int num_rows,
                                     const float *const *k_rows, const char *const *next_k,
                                     int64_t elem, int64_t n, float *s)
{
    for (int64_t t = 0; t < n; t += 2) {
        const float *k0 = k_rows[t], *k1 = t + 1 < n ? k_rows[t + 1] : k0;
        const char *p0 = next_k[t], *p1 = t + 1 < n ? next_k[t + 1] : p0;
        f32x8 a0[ROW_GROUP] = {0}, a1[ROW_GROUP] = {0};
        for (int64_t d = 0; d < dim; d += 8) {
            if (elem && d % DIM_CHUNK == 0) {
                __builtin_prefetch(p0 + d * elem, 0, 2);
                __builtin_prefetch(p1 + d * elem, 0, 2);
            }
            f32x8 x0 = load8(k0 + d), x1 = load8(k1 + d);
            for (int r = 0; r < num_rows; r++) {
                f32x8 qv = load8(q + r * dim + d);
                a0[r] += qv * x0;
                a1[r] += qv * x1;
            }
        }
        for (int r = 0; r < num_rows; r++) {
            s[r * KV_TILE + t] = hsum8(a0[r]);
            if (t + 1 < n) s[r * KV_TILE + t + 1] = hsum8(a1[r]);
        }
    }
}

/* acc[r] += sum_t p[r][t] * v[t] for num_rows (<= ROW_GROUP) rows; prefetches the next_v
 * rows along unless elem is 0. */
static ALWAYS_INLINE void accumulate_rows(const float *p, const float *const *v_rows,
                                          const char *const *next_v, int64_t elem, int64_t n,
                                          int64_t dim, const int num_rows, float *acc)
{
    for (int64_t d = 0; d < dim; d += DIM_CHUNK) {
        f32x8 a0[ROW_GROUP], a1[ROW_GROUP];
        for (int r = 0; r < num_rows; r++) {
            a0[r] = load8(acc + r * dim + d);
            a1[r] = load8(acc + r * dim + d + 8);
        }
        for (int64_t t = 0; t < n; t++) {
            if (elem) __builtin_prefetch(next_v[t] + d * elem, 0, 2);
            f32x8 x0 = load8(v_rows[t] + d), x1 = load8(v_rows[t] + d + 8);
            for (int r = 0; r < num_rows; r++) {
                f32x8 pr = splat8(p[r * KV_TILE + t]);
                a0[r] += pr * x0;
                a1[r] += pr * x1;
            }
        }
        for (int r = 0; r < num_rows; r++) {
            store8(acc + r * dim + d, a0[r]);
            store8(acc + r * dim + d + 8, a1[r]);
        }
    }
}

/* Compile-time row counts let the compiler keep every accumulator in a register. */
#define FOR_ROW_GROUPS(num_rows, CALL)                                          \
    for (int64_t r0 = 0; r0 < (num_rows); r0 += ROW_GROUP) {                    \
        switch ((num_rows) - r0 < ROW_GROUP ? (num_rows) - r0 : ROW_GROUP) {    \
        case 1: CALL(1); break;                                                 \
        case 2: CALL(2); break;                                                 \
        case 3: CALL(3); break;                                                 \
        default: CALL(4); break;                                                \
        }                                                                       \
    }

/* Online-softmax step of one row: turns its n_valid scores into probabilities (0 up to
 * KV_TILE), rescales its accumulator and running sum when the running max grows. */
static void softmax_row(float *s, int64_t n_valid, float *m, float *l, float *acc, int64_t dim)
{
    const i32x8 iota = {0, 1, 2, 3, 4, 5, 6, 7};
    const f32x8 minus_inf = splat8(-INFINITY);
    f32x8 mx8 = minus_inf;
    for (int64_t t = 0; t < KV_TILE; t += 8) {
        f32x8 x = select8(iota + (int32_t)t < (int32_t)n_valid, load8(s + t), minus_inf);
        mx8 = select8(x > mx8, x, mx8);
    }
    float mx = *m;
    for (int j = 0; j < 8; j++) mx = mx8[j] > mx ? mx8[j] : mx;
    f32x8 sum = {0};
    for (int64_t t = 0; t < KV_TILE; t += 8) {
        i32x8 is_valid = iota + (int32_t)t < (int32_t)n_valid;
        f32x8 p = select8(is_valid, exp8(load8(s + t) - mx), splat8(0.0f));
        store8(s + t, p);
        sum += p;
    }
    if (mx > *m) {
        float corr = *m == -INFINITY ? 0.0f : exp8(splat8(*m - mx))[0];
        *l *= corr;
        for (int64_t d = 0; d < dim; d += 8) store8(acc + d, load8(acc + d) * corr);
        *m = mx;
    }
    *l += hsum8(sum);
}

#endif
