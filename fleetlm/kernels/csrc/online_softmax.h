/* The inner loops of paged attention over one kv tile: scores, online softmax, P @ V.
 * Rows are query rows of one kv head, tokens the tile's kv tokens (KV_TILE at most). Vectors
 * are VLEN lanes (vector.h): 16 with AVX-512, 8 otherwise. */
#ifndef FLEETLM_ONLINE_SOFTMAX_H
#define FLEETLM_ONLINE_SOFTMAX_H

#include <math.h>

#include "vector.h"

#define KV_TILE 32    /* kv tokens per online-softmax step */
#define ROW_GROUP 4   /* query rows that share each K/V vector load */
#define DIM_CHUNK 16  /* head_dim slice held in registers during P @ V */
#define CHUNK_VECS (DIM_CHUNK / VLEN)
/* Independent P @ V sums per output vector: enough FMAs in flight to cover their latency,
 * within the register file (32 vectors with AVX-512, 16 with AVX2). */
#define ACC_STREAMS (VLEN == 16 ? 2 : 1)
/* Loops over rows, tokens and vectors of a register tile, unrolled so that its values stay
 * in registers. */
#define UNROLLED _Pragma("GCC unroll 16")
/* A vector loaded once and kept in a register: left alone, GCC folds the load into every
 * multiply-add that reads it, and the loop is bound by loads (two a cycle) instead of FMAs. */
#if defined(__AVX__)
#define IN_REGISTER(x) __asm__("" : "+v"(x))
#else
#define IN_REGISTER(x) ((void)0)
#endif

/* A KV cache's dtype, and how the row path reads a tile's kv rows: fp32, bf16 or int8 values
 * straight from the cache (int8 unscaled: its scales are applied to the scores and the
 * probabilities instead), or fp32 copies (KV_F32). */
enum { KV_F32 = 0, KV_BF16 = 1, KV_INT8 = 2 };

/* VLEN values of a kv row as fp32, from element d. */
static ALWAYS_INLINE fvec load_row(const void *row, const int kind, int64_t d)
{
    return kind == KV_BF16   ? loadv_bf16((const uint16_t *)row + d)
           : kind == KV_INT8 ? loadv_i8((const int8_t *)row + d)
                               : loadv((const float *)row + d);
}

/* Part i of prefetching a row of bytes (nothing when bytes is 0): the line at byte 64 i, and
 * with the last of them the row's last byte, which may sit on one line more (an int8 row of
 * 68 bytes spans two or three lines). Spread over a loop, so that the row's lines are not
 * asked for in one burst, which would stall on the miss queue. */
static ALWAYS_INLINE void prefetch_part(const char *row, int64_t bytes, int64_t i)
{
    if (64 * i >= bytes) return;
    __builtin_prefetch(row + 64 * i, 0, 2);
    if (64 * (i + 1) >= bytes) __builtin_prefetch(row + bytes - 1, 0, 2);
}

#define SCORE_TOKENS 4 /* kv tokens scored at once: ROW_GROUP x 4 sums in registers */

/* The sums of a[0..3]'s lanes, in hsumv's order: three levels of fold_sums' pairs. */
static ALWAYS_INLINE void fold4(const fvec a[SCORE_TOKENS], float out[SCORE_TOKENS])
{
#if VLEN == 16
    fvec v = FOLD_PAIR(FOLD_PAIR(a[0], a[1], 8), FOLD_PAIR(a[2], a[3], 8), 4);
    v = FOLD_PAIR(v, v, 2);
#else
    fvec v = FOLD_PAIR(FOLD_PAIR(a[0], a[1], 4), FOLD_PAIR(a[2], a[3], 4), 2);
#endif
    v = FOLD_PAIR(v, v, 1); /* a[0]'s sum in lane 0, a[1]'s at VLEN / 2, a[2]'s at VLEN / 4 */
    out[0] = v[0];
    out[1] = v[VLEN / 2];
    out[2] = v[VLEN / 4];
    out[3] = v[3 * VLEN / 4];
}

/* s[r][t] = q[r] . k[t] (times k_scale[t] for int8 rows) for num_rows (<= ROW_GROUP) rows and
 * the tile's n tokens, k_rows padded to a multiple of SCORE_TOKENS; prefetches the next_k
 * rows along, row_bytes each. Four tokens at a time: each kv vector is loaded (and converted)
 * once for all rows, and the 4 x rows dot products are summed across lanes together, where
 * one horizontal sum per row and token cost as much as the products. A row's sums do not
 * depend on the other rows. */
static ALWAYS_INLINE void score_rows(const float *q, int64_t dim, const int num_rows,
                                     const void *const *k_rows, const int kind,
                                     const float *k_scale, const char *const *next_k,
                                     int64_t row_bytes, int64_t n, float *s)
{
    for (int64_t t0 = 0; t0 < n; t0 += SCORE_TOKENS) {
        fvec a[ROW_GROUP][SCORE_TOKENS] = {{{0}}};
        for (int64_t d = 0; d < dim; d += VLEN)
            UNROLLED
            for (int j = 0; j < SCORE_TOKENS; j++) {
                prefetch_part(next_k[t0 + j], row_bytes, d / VLEN);
                const fvec k = load_row(k_rows[t0 + j], kind, d);
                UNROLLED
                for (int r = 0; r < num_rows; r++) a[r][j] += loadv(q + r * dim + d) * k;
            }
        UNROLLED
        for (int r = 0; r < num_rows; r++) {
            float sums[SCORE_TOKENS];
            fold4(a[r], sums);
            UNROLLED
            for (int j = 0; j < SCORE_TOKENS; j++)
                s[r * KV_TILE + t0 + j] = kind == KV_INT8 ? sums[j] * k_scale[t0 + j] : sums[j];
        }
    }
}

/* acc[r] += sum_t p[r][t] * v[t] for num_rows (<= ROW_GROUP) rows; prefetches the next_v
 * rows along, row_bytes each. Token t adds into sum t % ACC_STREAMS, so a row's result is
 * the same whichever rows share its call. */
static ALWAYS_INLINE void accumulate_rows(const float *p, const void *const *v_rows,
                                          const int kind, const char *const *next_v,
                                          int64_t row_bytes, int64_t n, int64_t dim,
                                          const int num_rows, float *acc)
{
    for (int64_t d = 0; d < dim; d += DIM_CHUNK) {
        fvec a[ACC_STREAMS][ROW_GROUP][CHUNK_VECS] = {{{{0}}}};
        UNROLLED
        for (int r = 0; r < num_rows; r++)
            UNROLLED
            for (int c = 0; c < CHUNK_VECS; c++) a[0][r][c] = loadv(acc + r * dim + d + c * VLEN);
        int64_t t = 0;
        for (; t + ACC_STREAMS <= n; t += ACC_STREAMS) {
            UNROLLED
            for (int j = 0; j < ACC_STREAMS; j++) {
                prefetch_part(next_v[t + j], row_bytes, d / DIM_CHUNK);
                fvec x[CHUNK_VECS];
                UNROLLED
                for (int c = 0; c < CHUNK_VECS; c++)
                    x[c] = load_row(v_rows[t + j], kind, d + c * VLEN);
                UNROLLED
                for (int r = 0; r < num_rows; r++) {
                    fvec pr = splatv(p[r * KV_TILE + t + j]);
                    UNROLLED
                    for (int c = 0; c < CHUNK_VECS; c++) a[j][r][c] += pr * x[c];
                }
            }
        }
        for (; t < n; t++) { /* the tail, fewer tokens than streams */
            const int j = (int)(t % ACC_STREAMS);
            prefetch_part(next_v[t], row_bytes, d / DIM_CHUNK);
            fvec x[CHUNK_VECS];
            UNROLLED
            for (int c = 0; c < CHUNK_VECS; c++) x[c] = load_row(v_rows[t], kind, d + c * VLEN);
            UNROLLED
            for (int r = 0; r < num_rows; r++) {
                fvec pr = splatv(p[r * KV_TILE + t]);
                UNROLLED
                for (int c = 0; c < CHUNK_VECS; c++) a[j][r][c] += pr * x[c];
            }
        }
        UNROLLED
        for (int r = 0; r < num_rows; r++)
            UNROLLED
            for (int c = 0; c < CHUNK_VECS; c++) {
                fvec sum = a[0][r][c];
                UNROLLED
                for (int j = 1; j < ACC_STREAMS; j++) sum += a[j][r][c];
                storev(acc + r * dim + d + c * VLEN, sum);
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
    ivec iota;
    for (int j = 0; j < VLEN; j++) iota[j] = j;
    const fvec minus_inf = splatv(-INFINITY);
    fvec mxv = minus_inf;
    for (int64_t t = 0; t < KV_TILE; t += VLEN) {
        fvec x = selectv(iota + (int32_t)t < (int32_t)n_valid, loadv(s + t), minus_inf);
        mxv = selectv(x > mxv, x, mxv);
    }
    const float tile_max = hmaxv(mxv);
    const float mx = tile_max > *m ? tile_max : *m;
    fvec sum = {0};
    for (int64_t t = 0; t < KV_TILE; t += VLEN) {
        ivec is_valid = iota + (int32_t)t < (int32_t)n_valid;
        fvec p = selectv(is_valid, expv(loadv(s + t) - mx), splatv(0.0f));
        storev(s + t, p);
        sum += p;
    }
    if (mx > *m) {
        float corr = *m == -INFINITY ? 0.0f : expv(splatv(*m - mx))[0];
        *l *= corr;
        for (int64_t d = 0; d < dim; d += VLEN) storev(acc + d, loadv(acc + d) * corr);
        *m = mx;
    }
    *l += hsumv(sum);
}

/* ---- Rows in lanes (prefill tiles) ----------------------------------------------------------
 * LANE_ROWS query rows of one kv head, row r in lane r % VLEN of vector r / VLEN. Scores are
 * stored token-major: st[t * LANE_ROWS + r]; q and acc dimension-major: qt[d * LANE_ROWS + r]. */
#define LANE_VECS 2
#define LANE_ROWS (LANE_VECS * VLEN)
#define MIN_LANE_ROWS 8 /* fewer rows per kv head (decode: the GQA group) take the row path */
#define LANE_TOKENS (VLEN == 16 ? 8 : 4) /* kv tokens scored at once */
#define LANE_DIMS (VLEN == 16 ? 8 : 4)   /* head_dim columns accumulated at once */

/* st[t][r] = q[r] . k[t] for the tile's n tokens; prefetches the next_k rows along. */
static void score_lanes(const float *qt, int64_t dim, const float *const *k_rows,
                        const char *const *next_k, int64_t elem, int64_t n, float *st)
{
    for (int64_t t = 0; t < n; t += LANE_TOKENS) {
        const float *k[LANE_TOKENS];
        const char *p[LANE_TOKENS];
        UNROLLED
        for (int j = 0; j < LANE_TOKENS; j++) { /* past the tile's end: the last row again */
            k[j] = k_rows[t + j < n ? t + j : n - 1];
            p[j] = next_k[t + j < n ? t + j : n - 1];
        }
        fvec a[LANE_TOKENS][LANE_VECS] = {{{0}}};
        for (int64_t d = 0; d < dim; d++) {
            if (d % DIM_CHUNK == 0)
                UNROLLED
                for (int j = 0; j < LANE_TOKENS; j++) __builtin_prefetch(p[j] + d * elem, 0, 2);
            fvec q[LANE_VECS];
            UNROLLED
            for (int v = 0; v < LANE_VECS; v++) {
                q[v] = loadv(qt + d * LANE_ROWS + v * VLEN);
                IN_REGISTER(q[v]);
            }
            UNROLLED
            for (int j = 0; j < LANE_TOKENS; j++) {
                const fvec x = splatv(k[j][d]);
                UNROLLED
                for (int v = 0; v < LANE_VECS; v++) a[j][v] += q[v] * x;
            }
        }
        for (int j = 0; j < LANE_TOKENS; j++)
            if (t + j < n)
                for (int v = 0; v < LANE_VECS; v++)
                    storev(st + (t + j) * LANE_ROWS + v * VLEN, a[j][v]);
    }
}

/* Online-softmax step of one vector of rows (scores s[t * LANE_ROWS], t < n, for kv tokens
 * start + t): a row sees tokens below its limit. Turns the scores into probabilities, updates
 * the running max m and sum l, and gives the factor the accumulator must be scaled by. */
static ALWAYS_INLINE void softmax_lanes(float *s, int64_t n, int64_t start, ivec limit,
                                        fvec *m, fvec *l, fvec *corr)
{
    const fvec minus_inf = splatv(-INFINITY);
    fvec mx = *m;
    for (int64_t t = 0; t < n; t++) {
        const ivec is_valid = (int32_t)(start + t) < limit;
        const fvec x = selectv(is_valid, loadv(s + t * LANE_ROWS), minus_inf);
        mx = selectv(x > mx, x, mx);
    }
    const ivec is_live = mx > minus_inf; /* the row has seen a token */
    *corr = selectv(is_live, expv(*m - mx), splatv(1.0f));
    fvec sum = {0};
    for (int64_t t = 0; t < n; t++) {
        const ivec is_valid = (int32_t)(start + t) < limit;
        const fvec p = selectv(is_valid, expv(loadv(s + t * LANE_ROWS) - mx), splatv(0.0f));
        storev(s + t * LANE_ROWS, p);
        sum += p;
    }
    *l = *l * *corr + sum;
    *m = mx;
}

/* acct[d][r] = acct[d][r] * corr[r] + sum_t p[t][r] * v[t][d]; prefetches the next_v rows
 * along. */
static void accumulate_lanes(const float *p, const float *const *v_rows,
                             const char *const *next_v, int64_t elem, int64_t n, int64_t dim,
                             const fvec *corr, float *acct)
{
    for (int64_t d = 0; d < dim; d += LANE_DIMS) {
        fvec a[LANE_DIMS][LANE_VECS];
        UNROLLED
        for (int c = 0; c < LANE_DIMS; c++)
            UNROLLED
            for (int v = 0; v < LANE_VECS; v++)
                a[c][v] = loadv(acct + (d + c) * LANE_ROWS + v * VLEN) * corr[v];
        for (int64_t t = 0; t < n; t++) {
            if (d % DIM_CHUNK == 0) __builtin_prefetch(next_v[t] + d * elem, 0, 2);
            fvec pt[LANE_VECS];
            UNROLLED
            for (int v = 0; v < LANE_VECS; v++) {
                pt[v] = loadv(p + t * LANE_ROWS + v * VLEN);
                IN_REGISTER(pt[v]);
            }
            UNROLLED
            for (int c = 0; c < LANE_DIMS; c++) {
                const fvec x = splatv(v_rows[t][d + c]);
                UNROLLED
                for (int v = 0; v < LANE_VECS; v++) a[c][v] += pt[v] * x;
            }
        }
        UNROLLED
        for (int c = 0; c < LANE_DIMS; c++)
            UNROLLED
            for (int v = 0; v < LANE_VECS; v++)
                storev(acct + (d + c) * LANE_ROWS + v * VLEN, a[c][v]);
    }
}

#endif
