/* Paged attention for CPUs: decode and prefill-with-context over a block-paged KV cache.
 *
 * Plain C + OpenMP, compiled at first use by fleetlm/kernels/cpu_build.py and called through
 * ctypes by fleetlm/kernels/cpu_attention.py, which states the contract (shapes, dtypes,
 * contiguity). Work is split over (sequence, kv head, tile of query tokens); one task scores
 * every query row of its kv-head group against each K/V row, so the cache is read once per
 * group, with an online (flash-style) softmax in fp32.
 *
 * Cache layout: [num_blocks, block_size, num_kv_heads, head_dim], fp32 or bf16. Query rows
 * come in as fp32 [num_tokens, num_heads, head_dim]; output is fp32 of the same shape.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { KV_F32 = 0, KV_BF16 = 1 };
enum { OK = 0, ERR_SHAPE = 1, ERR_BLOCK_TABLE = 2, ERR_SEQ_LEN = 3, ERR_NO_MEMORY = 4 };

#define KV_TILE 32    /* kv tokens per online-softmax step */
#define ROW_GROUP 4   /* query rows that share each K/V vector load */
#define DIM_CHUNK 16  /* head_dim slice (two vectors) held in registers during P @ V */
#define CACHE_LINE 64
#define TASKS_PER_THREAD 4 /* enough tasks for dynamic scheduling to even out lengths */
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* GCC/Clang vector extensions: one source for AVX2, AVX-512, NEON or plain SSE builds. */
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

typedef struct {
    const void *k_cache, *v_cache;
    int kv_dtype;
    const int32_t *block_table; /* this sequence's row */
    int64_t block_size, num_kv_heads, head_dim;
} KvView;

typedef struct { /* per-thread scratch */
    float *q, *acc, *m, *l, *s, *k, *v; /* k, v: a bf16 tile converted to fp32 */
    const float **k_rows, **v_rows;     /* the tile's rows, in the cache or in k, v */
    int64_t *limit, *out_offset;        /* per row: kv tokens visible, where its output goes */
} Scratch;

static ALWAYS_INLINE f32x8 load8(const float *p)
{
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static ALWAYS_INLINE void store8(float *p, f32x8 v) { memcpy(p, &v, sizeof v); }

static ALWAYS_INLINE f32x8 splat8(float x) { return (f32x8){x, x, x, x, x, x, x, x}; }

/* Lane-wise mask ? a : b, for a mask from a vector comparison (all ones or all zeros). */
static ALWAYS_INLINE f32x8 select8(i32x8 mask, f32x8 a, f32x8 b)
{
    return (f32x8)(((i32x8)a & mask) | ((i32x8)b & ~mask));
}

/* bf16 is the top half of an fp32. */
static ALWAYS_INLINE f32x8 load8_bf16(const uint16_t *p)
{
    u16x8 h;
    memcpy(&h, p, sizeof h);
    return (f32x8)(__builtin_convertvector(h, u32x8) << 16);
}

static ALWAYS_INLINE float hsum8(f32x8 a)
{
    f32x4 lo, hi;
    memcpy(&lo, &a, sizeof lo);
    memcpy(&hi, (const char *)&a + sizeof lo, sizeof hi);
    f32x4 s = lo + hi;
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); inputs below -87 give ~1e-38. */
static ALWAYS_INLINE f32x8 exp8(f32x8 x)
{
    const f32x8 round_magic = splat8(12582912.0f); /* 1.5 * 2^23: adds round to integer */
    x = select8(x < -87.0f, splat8(-87.0f), x);
    f32x8 n = (x * 1.44269504088896341f + round_magic) - round_magic;
    f32x8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    f32x8 p = splat8(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    i32x8 bits = (__builtin_convertvector(n, i32x8) + 127) << 23;
    return p * (f32x8)bits;
}

/* Points k_rows/v_rows at kv tokens [start, start + n) of kv_head: into the cache for fp32,
 * into converted copies for bf16. */
static void load_tile(const KvView *kv, int64_t kv_head, int64_t start, int64_t n, Scratch *sc)
{
    const int64_t dim = kv->head_dim, row_stride = kv->num_kv_heads * dim;
    int64_t block = start / kv->block_size, offset = start % kv->block_size;
    for (int64_t t = 0; t < n; t++, offset++) {
        if (offset == kv->block_size) {
            block++;
            offset = 0;
        }
        int64_t row = (kv->block_table[block] * kv->block_size + offset) * row_stride
                      + kv_head * dim;
        if (kv->kv_dtype == KV_F32) {
            sc->k_rows[t] = (const float *)kv->k_cache + row;
            sc->v_rows[t] = (const float *)kv->v_cache + row;
            continue;
        }
        const uint16_t *k = (const uint16_t *)kv->k_cache + row;
        const uint16_t *v = (const uint16_t *)kv->v_cache + row;
        for (int64_t d = 0; d < dim; d += 8) {
            store8(sc->k + t * dim + d, load8_bf16(k + d));
            store8(sc->v + t * dim + d, load8_bf16(v + d));
        }
        sc->k_rows[t] = sc->k + t * dim;
        sc->v_rows[t] = sc->v + t * dim;
    }
}

/* Asks for kv tokens [start, start + n) of kv heads [head_begin, head_end) to be brought into
 * the L2 cache: blocks sit at random places, where the hardware prefetcher cannot follow. */
static void prefetch_tile(const KvView *kv, int64_t head_begin, int64_t head_end,
                          int64_t start, int64_t n)
{
    const int64_t elem = kv->kv_dtype == KV_F32 ? 4 : 2;
    const int64_t bytes = (head_end - head_begin) * kv->head_dim * elem;
    const int64_t row_bytes = kv->num_kv_heads * kv->head_dim * elem;
    int64_t block = start / kv->block_size, offset = start % kv->block_size;
    for (int64_t t = 0; t < n; t++, offset++) {
        if (offset == kv->block_size) {
            block++;
            offset = 0;
        }
        int64_t first = (kv->block_table[block] * kv->block_size + offset) * row_bytes
                        + head_begin * kv->head_dim * elem;
        for (int64_t b = 0; b < bytes; b += CACHE_LINE) {
            __builtin_prefetch((const char *)kv->k_cache + first + b, 0, 2);
            __builtin_prefetch((const char *)kv->v_cache + first + b, 0, 2);
        }
    }
}

/* s[r][t] = q[r] . k[t] for num_rows (<= ROW_GROUP) rows, two tokens at a time. */
static ALWAYS_INLINE void score_rows(const float *q, int64_t dim, const int num_rows,
                                     const float *const *k_rows, int64_t n, float *s)
{
    for (int64_t t = 0; t < n; t += 2) {
        const float *k0 = k_rows[t], *k1 = t + 1 < n ? k_rows[t + 1] : k0;
        f32x8 a0[ROW_GROUP] = {0}, a1[ROW_GROUP] = {0};
        for (int64_t d = 0; d < dim; d += 8) {
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

/* acc[r] += sum_t p[r][t] * v[t] for num_rows (<= ROW_GROUP) rows. */
static ALWAYS_INLINE void accumulate_rows(const float *p, const float *const *v_rows,
                                          int64_t n, int64_t dim, const int num_rows,
                                          float *acc)
{
    for (int64_t d = 0; d < dim; d += DIM_CHUNK) {
        f32x8 a0[ROW_GROUP], a1[ROW_GROUP];
        for (int r = 0; r < num_rows; r++) {
            a0[r] = load8(acc + r * dim + d);
            a1[r] = load8(acc + r * dim + d + 8);
        }
        for (int64_t t = 0; t < n; t++) {
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

/* One kv tile's work for the rows of one kv head (rows [0, num_rows) of the pointers). */
static void attend_tile(Scratch *sc, int64_t first_row, int64_t num_rows, int64_t start,
                        int64_t n, int64_t dim)
{
    float *q = sc->q + first_row * dim, *acc = sc->acc + first_row * dim;
    float *s = sc->s + first_row * KV_TILE;
#define SCORE(rows) score_rows(q + r0 * dim, dim, rows, sc->k_rows, n, s + r0 * KV_TILE)
    FOR_ROW_GROUPS(num_rows, SCORE)
    for (int64_t r = first_row; r < first_row + num_rows; r++) {
        int64_t n_valid = sc->limit[r] - start;
        n_valid = n_valid < 0 ? 0 : n_valid < n ? n_valid : n;
        softmax_row(sc->s + r * KV_TILE, n_valid, &sc->m[r], &sc->l[r], sc->acc + r * dim, dim);
    }
#define ACCUMULATE(rows) \
    accumulate_rows(s + r0 * KV_TILE, sc->v_rows, n, dim, rows, acc + r0 * dim)
    FOR_ROW_GROUPS(num_rows, ACCUMULATE)
}

/* Attention of the scaled query rows in sc->q, rows_per_head of them for each of kv heads
 * [head_begin, head_end), head-major. Row r sees kv tokens [0, limit[r]); its normalised
 * result goes to out + out_offset[r]. Each kv tile is visited once for all heads, so the
 * cache is read in whole token rows. */
static void attend_rows(const KvView *kv, Scratch *sc, int64_t head_begin, int64_t head_end,
                        int64_t rows_per_head, float *out)
{
    const int64_t dim = kv->head_dim, num_rows = (head_end - head_begin) * rows_per_head;
    int64_t kv_len = 0;
    for (int64_t r = 0; r < num_rows; r++) {
        kv_len = sc->limit[r] > kv_len ? sc->limit[r] : kv_len;
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.0f;
    }
    memset(sc->acc, 0, num_rows * dim * sizeof(float));
    for (int64_t start = 0; start < kv_len; start += KV_TILE) {
        int64_t n = kv_len - start < KV_TILE ? kv_len - start : KV_TILE;
        int64_t n_next = kv_len - start - n < KV_TILE ? kv_len - start - n : KV_TILE;
        prefetch_tile(kv, head_begin, head_end, start + n, n_next);
        for (int64_t h = head_begin; h < head_end; h++) {
            load_tile(kv, h, start, n, sc);
            attend_tile(sc, (h - head_begin) * rows_per_head, rows_per_head, start, n, dim);
        }
    }
    for (int64_t r = 0; r < num_rows; r++) {
        float inv = sc->l[r] > 0.0f ? 1.0f / sc->l[r] : 0.0f;
        for (int64_t d = 0; d < dim; d++) out[sc->out_offset[r] + d] = sc->acc[r * dim + d] * inv;
    }
}

static int scratch_alloc(Scratch *sc, int64_t max_rows, int64_t dim)
{
    sc->q = malloc(max_rows * dim * sizeof(float));
    sc->acc = malloc(max_rows * dim * sizeof(float));
    sc->m = malloc(max_rows * sizeof(float));
    sc->l = malloc(max_rows * sizeof(float));
    sc->s = malloc(max_rows * KV_TILE * sizeof(float));
    sc->k = malloc(KV_TILE * dim * sizeof(float));
    sc->v = malloc(KV_TILE * dim * sizeof(float));
    sc->k_rows = malloc(KV_TILE * sizeof(float *));
    sc->v_rows = malloc(KV_TILE * sizeof(float *));
    sc->limit = malloc(max_rows * sizeof(int64_t));
    sc->out_offset = malloc(max_rows * sizeof(int64_t));
    return sc->q && sc->acc && sc->m && sc->l && sc->s && sc->k && sc->v && sc->k_rows &&
           sc->v_rows && sc->limit && sc->out_offset;
}

static void scratch_free(Scratch *sc)
{
    free(sc->q); free(sc->acc); free(sc->m); free(sc->l); free(sc->s); free(sc->k);
    free(sc->v); free(sc->k_rows); free(sc->v_rows); free(sc->limit); free(sc->out_offset);
}

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

/* Query tokens [i_begin, i_end) of a sequence whose first token is packed row token0, for
 * kv heads [head_begin, head_end): row (h, i, g) is query head h * group + g at kv position
 * context + i. */
static void run_task(const KvView *kv, Scratch *sc, const float *query, float *out,
                     int64_t token0, int64_t i_begin, int64_t i_end, int64_t context,
                     int64_t head_begin, int64_t head_end, int64_t num_heads, float scale)
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
    attend_rows(kv, sc, head_begin, head_end, (i_end - i_begin) * group, out);
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

/* Packed prefill with context. cu_seqlens_q [num_seqs + 1] (NULL: one query token per
 * sequence, i.e. decode), seq_lens [num_seqs] (kv length, >= the sequence's query length),
 * block_tables [num_seqs, max_blocks]. Returns 0, or an ERR_* code with nothing written. */
int fleet_paged_attention(const float *query, const void *k_cache, const void *v_cache,
                          int kv_dtype, int64_t num_blocks, int64_t block_size,
                          int64_t num_kv_heads, int64_t head_dim, const int32_t *cu_seqlens_q,
                          const int32_t *seq_lens, const int32_t *block_tables,
                          int64_t max_blocks, int64_t num_seqs, int64_t num_heads,
                          int64_t tokens_per_task, float scale, float *out, int num_threads)
{
    if (num_kv_heads < 1 || num_heads % num_kv_heads || head_dim % DIM_CHUNK ||
        (kv_dtype != KV_F32 && kv_dtype != KV_BF16) || tokens_per_task < 1)
        return ERR_SHAPE;
    int64_t *task_start = malloc((num_seqs + 1) * sizeof(int64_t));
    if (!task_start) return ERR_NO_MEMORY;
    int status = plan_tasks(cu_seqlens_q, seq_lens, block_tables, max_blocks, num_seqs,
                            num_blocks, block_size, tokens_per_task, task_start);
    const int64_t num_tiles = status == OK ? task_start[num_seqs] : 0;
    /* Whole token rows read best, so split kv heads over tasks only to feed every thread. */
    int64_t num_splits = (TASKS_PER_THREAD * num_threads + num_tiles - 1) / (num_tiles + !num_tiles);
    num_splits = num_splits < 1 ? 1 : num_splits > num_kv_heads ? num_kv_heads : num_splits;
    const int64_t heads_per_task = (num_kv_heads + num_splits - 1) / num_splits;
    const int64_t num_tasks = num_tiles * num_splits;
    const int64_t max_rows = tokens_per_task * heads_per_task * (num_heads / num_kv_heads);
#pragma omp parallel num_threads(num_threads) if (num_tasks > 1)
    {
        Scratch sc;
        int is_ready = scratch_alloc(&sc, max_rows, head_dim);
        int64_t s = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; task++) {
            if (!is_ready) {
#pragma omp atomic write
                status = ERR_NO_MEMORY;
                continue;
            }
            int64_t tile = task / num_splits, head_begin = task % num_splits * heads_per_task;
            int64_t head_end = head_begin + heads_per_task;
            while (task_start[s + 1] <= tile) s++;
            while (task_start[s] > tile) s--;
            int64_t token0 = q_start(cu_seqlens_q, s);
            int64_t q_len = q_start(cu_seqlens_q, s + 1) - token0;
            int64_t i_begin = (tile - task_start[s]) * tokens_per_task;
            int64_t i_end = i_begin + tokens_per_task < q_len ? i_begin + tokens_per_task : q_len;
            KvView kv = {k_cache, v_cache, kv_dtype, block_tables + s * max_blocks, block_size,
                         num_kv_heads, head_dim};
            run_task(&kv, &sc, query, out, token0, i_begin, i_end, seq_lens[s] - q_len,
                     head_begin, head_end < num_kv_heads ? head_end : num_kv_heads, num_heads,
                     scale);
        }
        scratch_free(&sc);
    }
    free(task_start);
    return status;
}
