/* Paged attention for CPUs: decode and prefill-with-context over a block-paged KV cache.
 *
 * Plain C + OpenMP (with online_softmax.h and vector.h beside it), compiled at first use by
 * fleetlm/kernels/cpu_build.py and called through ctypes by fleetlm/kernels/cpu_attention.py,
 * which states the contract (shapes, dtypes, contiguity). A task is (sequence, tile of query
 * tokens, span of kv heads); it walks the sequence's kv tokens once in tiles, scoring every
 * query row of each kv head's group against each K/V row, with an online softmax in fp32.
 * A decode of fewer sequences than threads splits each sequence's kv tokens instead: a task
 * per span of tokens, over all kv heads, and the spans' softmax states merged at the end.
 *
 * Cache layout: [num_blocks, block_size, num_kv_heads, row], fp32 or bf16 (row = head_dim)
 * or int8 (row = head_dim + 4: the int8 values, then the row's float32 scale; value = q *
 * scale, see fleetlm/kernels/kv_quant.py). Query rows come in as fp32 [num_tokens, num_heads,
 * head_dim]; output is fp32 of the same shape. fleet_write_kv_int8 quantizes K/V into an int8
 * cache.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "online_softmax.h"
#include "team.h"

#define SCALE_BYTES 4 /* an int8 row's float32 scale */
#define QMAX 127.0f
enum { OK = 0, ERR_SHAPE = 1, ERR_BLOCK_TABLE = 2, ERR_SEQ_LEN = 3, ERR_NO_MEMORY = 4 };

#define TASKS_PER_THREAD 4 /* enough tasks for dynamic scheduling to even out lengths */
/* Decode: where sequences x longest kv length x query heads is below this (256 tokens of the
 * built-in model's 9 heads), one thread does it all: a region costs more than it saves. From
 * MIN_SPAN_TOKENS kv tokens a sequence's tokens are split over threads in spans. One
 * sequence of the built-in model's shapes (int8 cache, 2-vCPU EPYC, 2026-12-07): one thread
 * 6.0 / 12.8 / 27.5 us at 64 / 128 / 256 kv tokens, two threads in spans 14.7 / 17.9 / 26.6
 * (a region, a dynamic loop, a static one and their barriers: 8 us before any work). */
#define MIN_PARALLEL_DECODE_WORK (256 * 9)
#define MIN_SPAN_TOKENS 256
/* A span's result for one query row: running max, sum, then head_dim unnormalised values. */
#define SPAN_ROW(dim) ((dim) + 2)

typedef struct {
    const void *k_cache, *v_cache;
    int kv_dtype;
    const int32_t *block_table; /* this sequence's row */
    int64_t block_size, num_kv_heads, head_dim;
    int64_t row; /* elements of one (slot, head) row: head_dim, + SCALE_BYTES for int8 */
} KvView;

static inline int64_t elem_bytes(int kv_dtype)
{
    return kv_dtype == KV_F32 ? 4 : kv_dtype == KV_BF16 ? 2 : 1;
}

static inline int64_t row_elems(int kv_dtype, int64_t head_dim)
{
    return kv_dtype == KV_INT8 ? head_dim + SCALE_BYTES : head_dim;
}

typedef struct { /* per-thread scratch */
    float *q, *acc, *m, *l, *s, *k, *v; /* k, v: a bf16 or int8 tile converted to fp32 */
    float *k_scale, *v_scale;           /* an int8 tile's row scales, when read as it is */
    float *qt, *acct, *st;              /* the lanes path's q, acc and scores, row-minor */
    const void **k_rows, **v_rows;      /* the tile's rows, in the cache or in k, v */
    const char **next_k, **next_v;      /* the next tile's rows in the cache, to prefetch */
    int64_t *offsets, *next_offsets;    /* a tile's and the next's token offsets in the cache,
                                         * in elements, kv head 0's */
    const int32_t *offsets_table;       /* what they were computed for: the block table, */
    int64_t offsets_start, offsets_n;   /* the tile's first token and size (n + n_next) */
    int64_t *limit, *out_offset;        /* per row: kv tokens visible, where its output goes */
    char *memory;                       /* the one allocation all of the above lie in */
} Scratch;

/* Element offsets in the cache of kv tokens [start, start + n) of kv head 0. */
static void tile_offsets(const KvView *kv, int64_t start, int64_t n, int64_t *offsets)
{
    const int64_t row_stride = kv->num_kv_heads * kv->row;
    int64_t block = start / kv->block_size, offset = start % kv->block_size;
    for (int64_t t = 0; t < n; t++, offset++) {
        if (offset == kv->block_size) {
            block++;
            offset = 0;
        }
        offsets[t] = (kv->block_table[block] * kv->block_size + offset) * row_stride;
    }
}

/* Points k_rows/v_rows at kv tokens [start, start + n) of kv_head (into the cache for fp32,
 * and for bf16 and int8 when direct, with an int8 row's scales in k_scale/v_scale; else into
 * scaled fp32 copies), and next_k/next_v at the n_next tokens after them. Blocks sit at random
 * places the hardware prefetcher cannot guess, so the compute loops prefetch the next tile a
 * line at a time; a burst of prefetches would stall on the miss queue. The arrays are padded
 * to a multiple of SCORE_TOKENS by repeating the last token. */
static void load_tile(const KvView *kv, int64_t kv_head, int64_t start, int64_t n,
                      int64_t n_next, int direct, Scratch *sc)
{
    const int64_t dim = kv->head_dim, elem = elem_bytes(kv->kv_dtype);
    if (sc->offsets_table != kv->block_table || sc->offsets_start != start
        || sc->offsets_n != n + n_next) { /* the other heads of a tile reuse them */
        tile_offsets(kv, start, n, sc->offsets);
        tile_offsets(kv, start + n, n_next, sc->next_offsets);
        sc->offsets_table = kv->block_table;
        sc->offsets_start = start;
        sc->offsets_n = n + n_next;
    }
    const int64_t head = kv_head * kv->row;
    for (int64_t t = 0; t < n; t++) { /* nothing next: re-touch this tile */
        const int64_t at = (t < n_next ? sc->next_offsets[t] : sc->offsets[t]) + head;
        sc->next_k[t] = (const char *)kv->k_cache + at * elem;
        sc->next_v[t] = (const char *)kv->v_cache + at * elem;
    }
    for (int64_t t = 0; t < n; t++) {
        const int64_t at = sc->offsets[t] + head;
        if (kv->kv_dtype == KV_F32) {
            sc->k_rows[t] = (const float *)kv->k_cache + at;
            sc->v_rows[t] = (const float *)kv->v_cache + at;
            continue;
        }
        if (kv->kv_dtype == KV_BF16 && direct) {
            sc->k_rows[t] = (const uint16_t *)kv->k_cache + at;
            sc->v_rows[t] = (const uint16_t *)kv->v_cache + at;
            continue;
        }
        if (kv->kv_dtype == KV_INT8) {
            const int8_t *k = (const int8_t *)kv->k_cache + at;
            const int8_t *v = (const int8_t *)kv->v_cache + at;
            float k_scale, v_scale;
            memcpy(&k_scale, k + dim, sizeof k_scale);
            memcpy(&v_scale, v + dim, sizeof v_scale);
            if (direct) {
                sc->k_rows[t] = k;
                sc->v_rows[t] = v;
                sc->k_scale[t] = k_scale;
                sc->v_scale[t] = v_scale;
                continue;
            }
            for (int64_t d = 0; d < dim; d += VLEN) {
                storev(sc->k + t * dim + d, loadv_i8(k + d) * k_scale);
                storev(sc->v + t * dim + d, loadv_i8(v + d) * v_scale);
            }
            sc->k_rows[t] = sc->k + t * dim;
            sc->v_rows[t] = sc->v + t * dim;
            continue;
        }
        const uint16_t *k = (const uint16_t *)kv->k_cache + at;
        const uint16_t *v = (const uint16_t *)kv->v_cache + at;
        for (int64_t d = 0; d < dim; d += VLEN) {
            storev(sc->k + t * dim + d, loadv_bf16(k + d));
            storev(sc->v + t * dim + d, loadv_bf16(v + d));
        }
        sc->k_rows[t] = sc->k + t * dim;
        sc->v_rows[t] = sc->v + t * dim;
    }
    for (int64_t t = n; t % SCORE_TOKENS; t++) {
        sc->k_rows[t] = sc->k_rows[n - 1];
        sc->v_rows[t] = sc->v_rows[n - 1];
        sc->next_k[t] = sc->next_k[n - 1];
        sc->next_v[t] = sc->next_v[n - 1];
        if (kv->kv_dtype == KV_INT8 && direct) sc->k_scale[t] = sc->v_scale[t] = 0.0f;
    }
}

/* One kv tile's work for the rows of one kv head (rows [0, num_rows) of the pointers, read
 * as kind: KV_F32, or a bf16 / int8 cache's own rows); the first row group prefetches the
 * next tile, row_bytes a row. */
static ALWAYS_INLINE void attend_tile(Scratch *sc, int64_t first_row, int64_t num_rows,
                                      int64_t start, int64_t n, int64_t dim, int64_t row_bytes,
                                      const int kind)
{
    float *q = sc->q + first_row * dim, *acc = sc->acc + first_row * dim;
    float *s = sc->s + first_row * KV_TILE;
#define SCORE(rows)                                                                          \
    score_rows(q + r0 * dim, dim, rows, sc->k_rows, kind, sc->k_scale, sc->next_k,          \
               r0 == 0 ? row_bytes : 0, n, s + r0 * KV_TILE)
    FOR_ROW_GROUPS(num_rows, SCORE)
#undef SCORE
    for (int64_t r = first_row; r < first_row + num_rows; r++) {
        int64_t n_valid = sc->limit[r] - start;
        n_valid = n_valid < 0 ? 0 : n_valid < n ? n_valid : n;
        softmax_row(sc->s + r * KV_TILE, n_valid, &sc->m[r], &sc->l[r], sc->acc + r * dim, dim);
        if (kind == KV_INT8) /* p * v_scale against the unscaled values */
            for (int64_t t = 0; t < KV_TILE; t += VLEN)
                storev(sc->s + r * KV_TILE + t, loadv(sc->s + r * KV_TILE + t) *
                                                     loadv(sc->v_scale + t));
    }
#define ACCUMULATE(rows)                                                                     \
    accumulate_rows(s + r0 * KV_TILE, sc->v_rows, kind, sc->next_v,                         \
                    r0 == 0 ? row_bytes : 0, n, dim, rows, acc + r0 * dim)
    FOR_ROW_GROUPS(num_rows, ACCUMULATE)
#undef ACCUMULATE
}

/* Rows [first, first + num_rows) of sc->q (num_rows <= LANE_ROWS), all of kv head h, with
 * rows in vector lanes: a prefill tile's rows share every K/V value, which is broadcast to
 * all of them at once, so no dot product needs a horizontal sum (the decode path's cost per
 * row and token). Same contract as attend_rows. */
static void attend_lanes(const KvView *kv, Scratch *sc, int64_t h, int64_t first,
                         int64_t num_rows, float *out)
{
    const int64_t dim = kv->head_dim, elem = elem_bytes(kv->kv_dtype);
    float *qt = sc->qt, *acct = sc->acct, *st = sc->st;
    ivec limit[LANE_VECS];
    int64_t kv_len = 0;
    for (int v = 0; v < LANE_VECS; v++)
        for (int j = 0; j < VLEN; j++) {
            const int64_t r = v * VLEN + j;
            limit[v][j] = r < num_rows ? (int32_t)sc->limit[first + r] : 0;
            kv_len = limit[v][j] > kv_len ? limit[v][j] : kv_len;
        }
    for (int64_t d = 0; d < dim; d++)
        for (int64_t r = 0; r < LANE_ROWS; r++)
            qt[d * LANE_ROWS + r] = r < num_rows ? sc->q[(first + r) * dim + d] : 0.0f;
    memset(acct, 0, dim * LANE_ROWS * sizeof(float));
    fvec m[LANE_VECS], l[LANE_VECS];
    for (int v = 0; v < LANE_VECS; v++) {
        m[v] = splatv(-INFINITY);
        l[v] = splatv(0.0f);
    }
    for (int64_t start = 0; start < kv_len; start += KV_TILE) {
        int64_t n = kv_len - start < KV_TILE ? kv_len - start : KV_TILE;
        int64_t n_next = kv_len - start - n < KV_TILE ? kv_len - start - n : KV_TILE;
        load_tile(kv, h, start, n, n_next, 0, sc);
        score_lanes(qt, dim, (const float *const *)sc->k_rows, sc->next_k, elem, n, st);
        fvec corr[LANE_VECS];
        for (int v = 0; v < LANE_VECS; v++)
            softmax_lanes(st + v * VLEN, n, start, limit[v], &m[v], &l[v], &corr[v]);
        accumulate_lanes(st, (const float *const *)sc->v_rows, sc->next_v, elem, n, dim, corr,
                         acct);
    }
    for (int64_t r = 0; r < num_rows; r++) {
        const float sum = l[r / VLEN][r % VLEN], inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int64_t d = 0; d < dim; d++)
            out[sc->out_offset[first + r] + d] = acct[d * LANE_ROWS + r] * inv;
    }
}

/* Attention of the scaled query rows in sc->q, rows_per_head of them for each of kv heads
 * [head_begin, head_end), head-major. Row r sees kv tokens [0, limit[r]); its normalised
 * result goes to out + out_offset[r]. Each kv tile is visited once for all heads, so the
 * cache is read in whole token rows.
 *
 * With `span` (decode rows only, see SPAN_ROW), the rows see only the tokens of their
 * sequence's span [span_begin, span_end) and leave their running max, sum and unnormalised
 * output in span + r * SPAN_ROW(dim) for merge_spans; out is not written. */
static void attend_rows(const KvView *kv, Scratch *sc, int64_t head_begin, int64_t head_end,
                        int64_t rows_per_head, float *out, int64_t span_begin,
                        int64_t span_end, float *span)
{
    const int64_t dim = kv->head_dim, num_rows = (head_end - head_begin) * rows_per_head;
    const int64_t row_bytes = kv->row * elem_bytes(kv->kv_dtype);
    if (rows_per_head >= MIN_LANE_ROWS) { /* a prefill tile */
        for (int64_t h = head_begin; h < head_end; h++)
            for (int64_t r = 0; r < rows_per_head; r += LANE_ROWS)
                attend_lanes(kv, sc, h, (h - head_begin) * rows_per_head + r,
                             rows_per_head - r < LANE_ROWS ? rows_per_head - r : LANE_ROWS, out);
        return;
    }
    /* A bf16 or int8 row read by one row group is converted as it is read; by several, once
     * into scratch. */
    const int direct = kv->kv_dtype != KV_F32 && rows_per_head <= ROW_GROUP;
    const int kind = direct ? kv->kv_dtype : KV_F32;
    int64_t kv_len = 0;
    for (int64_t r = 0; r < num_rows; r++) {
        kv_len = sc->limit[r] > kv_len ? sc->limit[r] : kv_len;
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.0f;
    }
    memset(sc->acc, 0, num_rows * dim * sizeof(float));
    if (span && span_end < kv_len) kv_len = span_end;
    for (int64_t start = span ? span_begin : 0; start < kv_len; start += KV_TILE) {
        int64_t n = kv_len - start < KV_TILE ? kv_len - start : KV_TILE;
        int64_t n_next = kv_len - start - n < KV_TILE ? kv_len - start - n : KV_TILE;
        for (int64_t h = head_begin; h < head_end; h++) {
            const int64_t first_row = (h - head_begin) * rows_per_head;
            load_tile(kv, h, start, n, n_next, direct, sc);
            if (kind == KV_BF16)
                attend_tile(sc, first_row, rows_per_head, start, n, dim, row_bytes, KV_BF16);
            else if (kind == KV_INT8)
                attend_tile(sc, first_row, rows_per_head, start, n, dim, row_bytes, KV_INT8);
            else
                attend_tile(sc, first_row, rows_per_head, start, n, dim, row_bytes, KV_F32);
        }
    }
    for (int64_t r = 0; r < num_rows && span; r++) {
        float *row = span + r * SPAN_ROW(dim);
        row[0] = sc->m[r];
        row[1] = sc->l[r];
        memcpy(row + 2, sc->acc + r * dim, dim * sizeof(float));
    }
    for (int64_t r = 0; r < num_rows && !span; r++) {
        float inv = sc->l[r] > 0.0f ? 1.0f / sc->l[r] : 0.0f;
        for (int64_t d = 0; d < dim; d++) out[sc->out_offset[r] + d] = sc->acc[r * dim + d] * inv;
    }
}

/* The next `bytes` of a scratch allocation at *at, each piece on a cache line of its own. */
static void *carve(char **at, size_t bytes)
{
    void *piece = *at;
    *at += (bytes + 63) / 64 * 64;
    return piece;
}

/* A thread's scratch in one allocation: a decode step called this once a layer, and twenty
 * mallocs and frees a call were a percent of a one-sequence step. */
static int scratch_alloc(Scratch *sc, int64_t max_rows, int64_t dim)
{
    const size_t f = sizeof(float), row = (size_t)max_rows, tile = KV_TILE;
    const size_t sizes[] = {
        row * dim * f, row * dim * f, row * f, row * f, row * tile * f, tile * dim * f,
        tile * dim * f, tile * f, tile * f, tile * sizeof(void *), tile * sizeof(void *),
        tile * sizeof(char *), tile * sizeof(char *), tile * sizeof(int64_t),
        tile * sizeof(int64_t), row * sizeof(int64_t), row * sizeof(int64_t),
        dim * LANE_ROWS * f, dim * LANE_ROWS * f, tile * LANE_ROWS * f};
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) total += (sizes[i] + 63) / 64 * 64;
    sc->memory = aligned_alloc(64, total);
    if (!sc->memory) return 0;
    char *at = sc->memory;
    sc->q = carve(&at, sizes[0]);
    sc->acc = carve(&at, sizes[1]);
    sc->m = carve(&at, sizes[2]);
    sc->l = carve(&at, sizes[3]);
    sc->s = carve(&at, sizes[4]);
    sc->k = carve(&at, sizes[5]);
    sc->v = carve(&at, sizes[6]);
    sc->k_scale = carve(&at, sizes[7]);
    sc->v_scale = carve(&at, sizes[8]);
    memset(sc->k_scale, 0, sizes[7]); /* padding stays finite */
    memset(sc->v_scale, 0, sizes[8]);
    sc->k_rows = carve(&at, sizes[9]);
    sc->v_rows = carve(&at, sizes[10]);
    sc->next_k = carve(&at, sizes[11]);
    sc->next_v = carve(&at, sizes[12]);
    sc->offsets = carve(&at, sizes[13]);
    sc->next_offsets = carve(&at, sizes[14]);
    sc->offsets_table = NULL;
    sc->limit = carve(&at, sizes[15]);
    sc->out_offset = carve(&at, sizes[16]);
    sc->qt = carve(&at, sizes[17]);
    sc->acct = carve(&at, sizes[18]);
    sc->st = carve(&at, sizes[19]);
    return 1;
}

static void scratch_free(Scratch *sc) { free(sc->memory); }

/* Checks every block id a sequence of kv_len tokens will read. */
static int check_blocks(const int32_t *block_table, int64_t max_blocks, int64_t kv_len,
                        int64_t block_size, int64_t num_blocks)
{
    int64_t used = (kv_len + block_size - 1) / block_size;
    if (used > max_blocks) return ERR_BLOCK_TABLE;
    for (int64_t b = 0; b < used; b++)
        if (block_table[b] < 0 || block_table[b] >= num_blocks) return ERR_BLOCK_TABLE;
    return OK;
}

/* One query row's result over the spans of its sequence: the rows at row, row + stride, ...
 * (each its running max, sum, then dim unnormalised values: SPAN_ROW), rescaled to the
 * largest max and normalised into out. A span with no tokens (max -inf) adds nothing. */
static void merge_spans(const float *row, int64_t num_spans, int64_t stride, int64_t dim,
                        float *out)
{
    float m = -INFINITY, l = 0.0f;
    for (int64_t p = 0; p < num_spans; p++) m = row[p * stride] > m ? row[p * stride] : m;
    for (int64_t d = 0; d < dim; d++) out[d] = 0.0f;
    for (int64_t p = 0; p < num_spans; p++) {
        const float *part = row + p * stride;
        if (part[0] == -INFINITY) continue;
        const float corr = expv(splatv(part[0] - m))[0];
        l += part[1] * corr;
        for (int64_t d = 0; d < dim; d += VLEN)
            storev(out + d, loadv(out + d) + loadv(part + 2 + d) * corr);
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t d = 0; d < dim; d += VLEN) storev(out + d, loadv(out + d) * inv);
}

/* Query tokens [i_begin, i_end) of a sequence whose first token is packed row token0, for
 * kv heads [head_begin, head_end): row (h, i, g) is query head h * group + g at kv position
 * context + i. */
static void run_task(const KvView *kv, Scratch *sc, const float *query, float *out,
                     int64_t token0, int64_t i_begin, int64_t i_end, int64_t context,
                     int64_t head_begin, int64_t head_end, int64_t num_heads, float scale,
                     int64_t span_begin, int64_t span_end, float *span)
{
    const int64_t dim = kv->head_dim, group = num_heads / kv->num_kv_heads;
    int64_t r = 0;
    for (int64_t h = head_begin; h < head_end; h++) {
        for (int64_t i = i_begin; i < i_end; i++) {
            for (int64_t g = 0; g < group; g++, r++) {
                int64_t offset = ((token0 + i) * num_heads + h * group + g) * dim;
                for (int64_t d = 0; d < dim; d++) sc->q[r * dim + d] = query[offset + d] * scale;
                sc->limit[r] = context + i + 1;
                sc->out_offset[r] = offset;
            }
        }
    }
    attend_rows(kv, sc, head_begin, head_end, (i_end - i_begin) * group, out, span_begin,
                span_end, span);
}

static inline int64_t q_start(const int32_t *cu_seqlens_q, int64_t s)
{
    return cu_seqlens_q ? cu_seqlens_q[s] : s;
}

/* Validates the batch and fills task_start[s] = first query tile of sequence s. */
static int plan_tasks(const int32_t *cu_seqlens_q, const int32_t *seq_lens,
                      const int32_t *block_tables, int64_t max_blocks, int64_t num_seqs,
                      int64_t num_blocks, int64_t block_size, int64_t tokens_per_task,
                      int64_t *task_start)
{
    task_start[0] = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t q_len = q_start(cu_seqlens_q, s + 1) - q_start(cu_seqlens_q, s);
        if (q_len < 0 || seq_lens[s] < q_len) return ERR_SEQ_LEN;
        int status = check_blocks(block_tables + s * max_blocks, max_blocks, seq_lens[s],
                                  block_size, num_blocks);
        if (status != OK) return status;
        task_start[s + 1] = task_start[s] + (q_len + tokens_per_task - 1) / tokens_per_task;
    }
    return OK;
}

/* One call's arguments (fleet_paged_attention's) and how its work is split: tasks over
 * (sequence, query tile, kv heads, span of kv tokens), the same for every thread. */
typedef struct {
    const float *query;
    const void *k_cache, *v_cache;
    int kv_dtype;
    int64_t num_blocks, block_size, num_kv_heads, head_dim;
    const int32_t *cu_seqlens_q, *seq_lens, *block_tables;
    int64_t max_blocks, num_seqs, num_heads, tokens_per_task;
    float scale;
    float *out;
    /* the split (plan_call) */
    int threads;          /* the threads the work is worth: 1 below MIN_PARALLEL_DECODE_WORK */
    int64_t *task_start;  /* [num_seqs + 1]: each sequence's first query tile */
    int64_t num_tasks, num_spans, span_len, num_splits, heads_per_task, max_rows;
    float *spans;         /* num_spans > 1: each span's rows (SPAN_ROW) for merge_spans */
} Call;

/* Validates the call and splits it for up to num_threads threads; the caller frees
 * c->task_start (on failure too). Spans are not allocated here. A team (is_team) shares out
 * any decode, however small (a sync costs 0.3 us, not a region's 2.5), by kv heads where a
 * region would not split the tokens into spans: that leaves every row's sums as one thread
 * makes them, and a team splits into spans exactly where a region does, so both give the
 * same bits. */
static int plan_call(Call *c, int num_threads, int is_team)
{
    c->num_tasks = 0;
    c->spans = NULL;
    if (c->num_kv_heads < 1 || c->num_heads % c->num_kv_heads || c->head_dim % DIM_CHUNK ||
        (c->kv_dtype != KV_F32 && c->kv_dtype != KV_BF16 && c->kv_dtype != KV_INT8) ||
        c->tokens_per_task < 1) {
        c->task_start = NULL;
        return ERR_SHAPE;
    }
    c->task_start = malloc((c->num_seqs + 1) * sizeof(int64_t));
    if (!c->task_start) return ERR_NO_MEMORY;
    int status = plan_tasks(c->cu_seqlens_q, c->seq_lens, c->block_tables, c->max_blocks,
                            c->num_seqs, c->num_blocks, c->block_size, c->tokens_per_task,
                            c->task_start);
    if (status != OK) return status;
    const int64_t num_tiles = c->task_start[c->num_seqs];
    const int64_t group = c->num_heads / c->num_kv_heads;
    int64_t max_kv_len = 0;
    for (int64_t s = 0; s < c->num_seqs; s++)
        max_kv_len = c->seq_lens[s] > max_kv_len ? c->seq_lens[s] : max_kv_len;
    /* Decode with fewer sequences than threads: each sequence's kv tokens are split into
     * spans, one task each over all kv heads (whole token rows), merged at the end. */
    int region_threads = num_threads; /* what a region would take */
    if (!c->cu_seqlens_q && c->num_seqs * max_kv_len * c->num_heads < MIN_PARALLEL_DECODE_WORK)
        region_threads = 1;
    c->threads = is_team ? num_threads : region_threads;
    c->num_spans = !c->cu_seqlens_q && group < MIN_LANE_ROWS && c->num_seqs < region_threads &&
                   max_kv_len >= MIN_SPAN_TOKENS
                       ? (region_threads + c->num_seqs - 1) / c->num_seqs : 1;
    /* Span length: whole KV_TILEs, so that spans read the tiles an unsplit walk would. */
    const int64_t span_tiles = c->num_spans * KV_TILE;
    c->span_len = (max_kv_len + span_tiles - 1) / span_tiles * KV_TILE;
    /* Whole token rows read best, so split kv heads over tasks only to feed every thread. */
    int64_t num_splits = (TASKS_PER_THREAD * c->threads + num_tiles - 1)
                         / (num_tiles + !num_tiles);
    c->num_splits = num_splits < 1 || c->num_spans > 1 ? 1
                    : num_splits > c->num_kv_heads ? c->num_kv_heads : num_splits;
    c->heads_per_task = (c->num_kv_heads + c->num_splits - 1) / c->num_splits;
    c->num_tasks = num_tiles * c->num_splits * c->num_spans;
    c->max_rows = c->tokens_per_task * c->heads_per_task * group;
    return OK;
}

static size_t span_floats(const Call *c)
{
    return (size_t)(c->num_seqs * c->num_spans * c->num_heads * SPAN_ROW(c->head_dim));
}

/* Task `task` of the call; *s: the sequence of the thread's last task (a search hint). */
static void call_task(const Call *c, Scratch *sc, int64_t task, int64_t *s)
{
    const int64_t part = task % c->num_spans, split_task = task / c->num_spans;
    const int64_t tile = split_task / c->num_splits;
    const int64_t head_begin = split_task % c->num_splits * c->heads_per_task;
    const int64_t head_end = head_begin + c->heads_per_task;
    while (c->task_start[*s + 1] <= tile) (*s)++;
    while (c->task_start[*s] > tile) (*s)--;
    const int64_t token0 = q_start(c->cu_seqlens_q, *s);
    const int64_t q_len = q_start(c->cu_seqlens_q, *s + 1) - token0;
    const int64_t i_begin = (tile - c->task_start[*s]) * c->tokens_per_task;
    const int64_t i_end = i_begin + c->tokens_per_task < q_len ? i_begin + c->tokens_per_task
                                                                : q_len;
    KvView kv = {c->k_cache, c->v_cache, c->kv_dtype, c->block_tables + *s * c->max_blocks,
                 c->block_size, c->num_kv_heads, c->head_dim,
                 row_elems(c->kv_dtype, c->head_dim)};
    run_task(&kv, sc, c->query, c->out, token0, i_begin, i_end, c->seq_lens[*s] - q_len,
             head_begin, head_end < c->num_kv_heads ? head_end : c->num_kv_heads, c->num_heads,
             c->scale, part * c->span_len, (part + 1) * c->span_len,
             c->spans ? c->spans + (*s * c->num_spans + part) * c->num_heads
                                   * SPAN_ROW(c->head_dim)
                      : NULL);
}

/* Query row r (sequence r / num_heads, head r % num_heads) merged over its spans. */
static void call_merge(const Call *c, int64_t r)
{
    merge_spans(c->spans + (r / c->num_heads * c->num_spans * c->num_heads + r % c->num_heads)
                               * SPAN_ROW(c->head_dim),
                c->num_spans, c->num_heads * SPAN_ROW(c->head_dim), c->head_dim,
                c->out + r * c->head_dim);
}

/* Tasks [begin, end) by one thread with its own scratch. */
static int call_tasks(const Call *c, int64_t begin, int64_t end)
{
    if (begin >= end) return OK;
    Scratch sc;
    if (!scratch_alloc(&sc, c->max_rows, c->head_dim)) return ERR_NO_MEMORY;
    int64_t s = 0;
    for (int64_t task = begin; task < end; task++) call_task(c, &sc, task, &s);
    scratch_free(&sc);
    return OK;
}

/* Packed prefill with context. cu_seqlens_q [num_seqs + 1] (NULL: one query token per
 * sequence, i.e. decode), seq_lens [num_seqs] (kv length, >= the sequence's query length),
 * block_tables [num_seqs, max_blocks]. Returns 0, or an ERR_* code with nothing written.
 * Work worth one thread runs without entering libgomp (a region of one thread costs 1 us). */
int fleet_paged_attention(const float *query, const void *k_cache, const void *v_cache,
                          int kv_dtype, int64_t num_blocks, int64_t block_size,
                          int64_t num_kv_heads, int64_t head_dim, const int32_t *cu_seqlens_q,
                          const int32_t *seq_lens, const int32_t *block_tables,
                          int64_t max_blocks, int64_t num_seqs, int64_t num_heads,
                          int64_t tokens_per_task, float scale, float *out, int num_threads)
{
    Call c = {query, k_cache, v_cache, kv_dtype, num_blocks, block_size, num_kv_heads,
              head_dim, cu_seqlens_q, seq_lens, block_tables, max_blocks, num_seqs, num_heads,
              tokens_per_task, scale, out};
    int status = plan_call(&c, num_threads, 0);
    if (status == OK && c.num_spans > 1) {
        c.spans = malloc(span_floats(&c) * sizeof(float));
        if (!c.spans) status = ERR_NO_MEMORY;
    }
    if (status == OK && (c.threads <= 1 || c.num_tasks <= 1)) {
        status = call_tasks(&c, 0, c.num_tasks);
        for (int64_t r = 0; c.spans && status == OK && r < num_seqs * num_heads; r++)
            call_merge(&c, r);
    } else if (status == OK) {
#pragma omp parallel num_threads(c.threads)
        {
            Scratch sc;
            int is_ready = scratch_alloc(&sc, c.max_rows, head_dim);
            int64_t s = 0;
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < c.num_tasks; task++) {
                if (!is_ready) {
#pragma omp atomic write
                    status = ERR_NO_MEMORY;
                    continue;
                }
                call_task(&c, &sc, task, &s);
            }
            if (is_ready) scratch_free(&sc);
            if (c.spans && status == OK) {
#pragma omp for schedule(static)
                for (int64_t r = 0; r < num_seqs * num_heads; r++) call_merge(&c, r);
            }
        }
    }
    free(c.spans);
    free(c.task_start);
    return status;
}

/* Floats of the span buffer fleet_paged_attention_team may need: a decode of num_seqs
 * sequences by a team of `threads`. */
int64_t fleet_paged_attention_span_floats(int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                          int threads)
{
    return num_seqs * (threads > 1 ? threads : 1) * num_heads * SPAN_ROW(head_dim);
}

/* A decode (one query token per sequence) by a team (team.h): each thread calls it with the
 * same arguments and takes its share of the tasks, statically (contiguous runs: a sequence's
 * spans go to different threads); where the work is worth one thread, thread 0 does it all.
 * `spans`: fleet_paged_attention_span_floats floats, shared. Returns this thread's status
 * (a bad batch: every thread's; no scratch: the thread's own, where `out` is then garbage):
 * the caller syncs the team and takes any thread's failure before `out` is read. */
int fleet_paged_attention_team(const float *query, const void *k_cache, const void *v_cache,
                               int kv_dtype, int64_t num_blocks, int64_t block_size,
                               int64_t num_kv_heads, int64_t head_dim, const int32_t *seq_lens,
                               const int32_t *block_tables, int64_t max_blocks, int64_t num_seqs,
                               int64_t num_heads, float scale, float *out, float *spans,
                               const Team *t)
{
    Call c = {query, k_cache, v_cache, kv_dtype, num_blocks, block_size, num_kv_heads,
              head_dim, NULL, seq_lens, block_tables, max_blocks, num_seqs, num_heads, 1,
              scale, out};
    int status = plan_call(&c, t->size, 1);
    if (status == OK) {
        c.spans = c.num_spans > 1 ? spans : NULL;
        int64_t begin = 0, end = t->id == 0 ? c.num_tasks : 0;
        if (c.threads > 1) team_share(t, c.num_tasks, &begin, &end);
        status = call_tasks(&c, begin, end);
        if (c.spans) { /* every span written before any row is merged */
            team_sync(t);
            int64_t first, last;
            team_share(t, num_seqs * num_heads, &first, &last);
            for (int64_t r = first; r < last; r++) call_merge(&c, r);
        }
    }
    free(c.task_start);
    return status;
}

static ALWAYS_INLINE f32x8 load8_input(const void *x, int is_bf16, int64_t d)
{
    return is_bf16 ? load8_bf16((const uint16_t *)x + d) : load8((const float *)x + d);
}

/* One row of head_dim values (fp32, or bf16 when is_bf16) into an int8 cache row: values
 * round(x * (1 / scale)) with scale = absmax / 127 (0 for a zero row), then the scale. Rounds
 * half to even, as torch.round does, so it equals kv_quant.quantize_rows. */
static void quantize_row(const void *x, int is_bf16, int64_t dim, int8_t *row)
{
    f32x8 amax8 = splat8(0.0f);
    for (int64_t d = 0; d < dim; d += 8) {
        f32x8 v = load8_input(x, is_bf16, d);
        v = select8(v < 0.0f, -v, v);
        amax8 = select8(v > amax8, v, amax8);
    }
    float amax = 0.0f;
    for (int j = 0; j < 8; j++) amax = amax8[j] > amax ? amax8[j] : amax;
    float scale = amax / QMAX, inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    for (int64_t d = 0; d < dim; d += 8) {
        f32x8 v = load8_input(x, is_bf16, d) * inverse;
        for (int j = 0; j < 8; j++) {
            float q = rintf(v[j]);
            row[d + j] = (int8_t)(q > QMAX ? QMAX : q < -QMAX ? -QMAX : q);
        }
    }
    memcpy(row + dim, &scale, sizeof scale);
}

/* write_kv_cache into an int8 cache [num_slots, num_kv_heads, head_dim + 4]: key and value
 * [num_tokens, num_kv_heads, head_dim] with the given token and head strides (in elements;
 * head_dim contiguous), fp32 or bf16 (is_bf16). Slots < 0 are skipped. Returns 0, or
 * ERR_SHAPE (nothing written) when head_dim is not a multiple of 8 or a slot is out of
 * range. */
int fleet_write_kv_int8(const void *key, const void *value, int is_bf16, int64_t token_stride_k,
                        int64_t head_stride_k, int64_t token_stride_v, int64_t head_stride_v,
                        const int64_t *slot_mapping, int64_t num_tokens, int64_t num_kv_heads,
                        int64_t head_dim, int64_t num_slots, int8_t *k_cache, int8_t *v_cache,
                        int num_threads)
{
    if (head_dim % 8) return ERR_SHAPE;
    for (int64_t t = 0; t < num_tokens; t++)
        if (slot_mapping[t] >= num_slots) return ERR_SHAPE;
    const int64_t row = head_dim + SCALE_BYTES, num_rows = num_tokens * num_kv_heads;
    const int64_t elem = is_bf16 ? 2 : 4;
    PARALLEL_FOR(num_rows > 256 ? num_threads : 1, r, num_rows,
        int64_t t = r / num_kv_heads, h = r % num_kv_heads, slot = slot_mapping[t];
        if (slot < 0) continue;
        int64_t target = (slot * num_kv_heads + h) * row;
        quantize_row((const char *)key + (t * token_stride_k + h * head_stride_k) * elem,
                     is_bf16, head_dim, k_cache + target);
        quantize_row((const char *)value + (t * token_stride_v + h * head_stride_v) * elem,
                     is_bf16, head_dim, v_cache + target);
    );
    return OK;
}
