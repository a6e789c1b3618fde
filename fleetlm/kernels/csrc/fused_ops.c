/* Fused elementwise steps of a decoder layer, for CPUs: residual add + RMSNorm, SiLU(gate) *
 * up, neox rotary on q and k in place, and the K/V write into a float cache. Each replaces
 * several torch ops (and their dispatch, allocation and temporaries) by one pass over the rows.
 *
 * Plain C + OpenMP (with vector.h beside it), compiled at first use by
 * fleetlm/kernels/cpu_build.py and called through ctypes by fleetlm/kernels/fused_ops.py,
 * which states the contract and holds the torch references. Tensors are fp32 or bf16
 * (is_bf16), rows contiguous; arithmetic is fp32 and a bf16 result is rounded to nearest even,
 * as torch rounds. A decode step's rows are small, so one thread serves them (a parallel
 * region costs more than the work); many rows (a prefill) are split over the threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector.h"

#define MIN_ELEMS_PER_THREAD 8192 /* below this a parallel region costs more than it saves */

static ALWAYS_INLINE int threads_for(int64_t elems, int num_threads)
{
    int64_t useful = elems / MIN_ELEMS_PER_THREAD;
    return useful < 1 ? 1 : useful < num_threads ? (int)useful : num_threads;
}

/* ---- fp32 / bf16 loads and stores --------------------------------------------------------- */
static ALWAYS_INLINE float from_bf16(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static ALWAYS_INLINE f32x8 vload(const void *p, int64_t i, const int is_bf16)
{
    return is_bf16 ? load8_bf16((const uint16_t *)p + i) : load8((const float *)p + i);
}

static ALWAYS_INLINE void vstore(void *p, int64_t i, f32x8 v, const int is_bf16)
{
    if (!is_bf16) {
        store8((float *)p + i, v);
        return;
    }
    store8_bf16((uint16_t *)p + i, v);
}

static ALWAYS_INLINE float sload(const void *p, int64_t i, const int is_bf16)
{
    return is_bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static ALWAYS_INLINE void sstore(void *p, int64_t i, float v, const int is_bf16)
{
    if (is_bf16)
        ((uint16_t *)p)[i] = to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* ---- residual add + RMSNorm ----------------------------------------------------------------- */
/* x += residual (if any; the sum stored in x's dtype), then out = x / rms(x) * weight. */
static ALWAYS_INLINE void add_rms_norm_row(void *x, const void *residual, const void *weight,
                                           void *out, int64_t dim, float eps, const int is_bf16)
{
    const int64_t vdim = dim & ~(int64_t)7;
    f32x8 acc = splat8(0.0f);
    float tail = 0.0f;
    for (int64_t i = 0; i < vdim; i += 8) {
        f32x8 v = vload(x, i, is_bf16);
        if (residual) {
            v += vload(residual, i, is_bf16);
            vstore(x, i, v, is_bf16);
            v = vload(x, i, is_bf16); /* the stored (rounded) sum is what is normalised */
        }
        acc += v * v;
    }
    for (int64_t i = vdim; i < dim; i++) {
        float v = sload(x, i, is_bf16);
        if (residual) {
            sstore(x, i, v + sload(residual, i, is_bf16), is_bf16);
            v = sload(x, i, is_bf16);
        }
        tail += v * v;
    }
    const float rstd = 1.0f / sqrtf((hsum8(acc) + tail) / (float)dim + eps);
    for (int64_t i = 0; i < vdim; i += 8)
        vstore(out, i, vload(x, i, is_bf16) * rstd * vload(weight, i, is_bf16), is_bf16);
    for (int64_t i = vdim; i < dim; i++)
        sstore(out, i, sload(x, i, is_bf16) * rstd * sload(weight, i, is_bf16), is_bf16);
}

int fleet_add_rms_norm(void *x, const void *residual, const void *weight, void *out,
                       int64_t rows, int64_t dim, float eps, int is_bf16, int num_threads)
{
    const int64_t elem = is_bf16 ? 2 : 4;
    PARALLEL_FOR(threads_for(rows * dim, num_threads), r, rows,
        char *xr = (char *)x + r * dim * elem, *outr = (char *)out + r * dim * elem;
        const char *rr = residual ? (const char *)residual + r * dim * elem : NULL;
        if (is_bf16)
            add_rms_norm_row(xr, rr, weight, outr, dim, eps, 1);
        else
            add_rms_norm_row(xr, rr, weight, outr, dim, eps, 0);
    );
    return 0;
}

/* ---- SiLU(gate) * up ------------------------------------------------------------------------- */
/* silu(g) = g / (1 + exp(-g)); expv takes arguments <= 0, so a negative g is written
 * g * e / (1 + e) with e = exp(g). */
static ALWAYS_INLINE fvec siluv(fvec g)
{
    const ivec is_neg = g < 0.0f;
    fvec e = expv(selectv(is_neg, g, -g));
    return selectv(is_neg, g * e, g) / (1.0f + e);
}

static ALWAYS_INLINE fvec wload(const void *p, int64_t i, const int is_bf16)
{
    return is_bf16 ? loadv_bf16((const uint16_t *)p + i) : loadv((const float *)p + i);
}

static ALWAYS_INLINE void wstore(void *p, int64_t i, fvec v, const int is_bf16)
{
    if (is_bf16)
        storev_bf16((uint16_t *)p + i, v);
    else
        storev((float *)p + i, v);
}

/* In vectors as wide as the CPU's (the exp is most of the work), then one at a time. */
static ALWAYS_INLINE void silu_mul_row(const void *gate_up, void *out, int64_t n,
                                       const int is_bf16)
{
    const int64_t wn = n - n % VLEN;
    for (int64_t i = 0; i < wn; i += VLEN)
        wstore(out, i, siluv(wload(gate_up, i, is_bf16)) * wload(gate_up, n + i, is_bf16),
               is_bf16);
    for (int64_t i = wn; i < n; i++) {
        float g = sload(gate_up, i, is_bf16);
        sstore(out, i, g / (1.0f + expf(-g)) * sload(gate_up, n + i, is_bf16), is_bf16);
    }
}

/* out[r] = silu(gate_up[r, :n]) * gate_up[r, n:]. */
int fleet_silu_mul(const void *gate_up, void *out, int64_t rows, int64_t n, int is_bf16,
                   int num_threads)
{
    const int64_t elem = is_bf16 ? 2 : 4;
    PARALLEL_FOR(threads_for(rows * n, num_threads), r, rows,
        const char *in = (const char *)gate_up + 2 * r * n * elem;
        char *o = (char *)out + r * n * elem;
        if (is_bf16)
            silu_mul_row(in, o, n, 1);
        else
            silu_mul_row(in, o, n, 0);
    );
    return 0;
}

/* ---- neox rotary, in place ------------------------------------------------------------------ */
/* One head: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), halves of head_dim. */
static ALWAYS_INLINE void rotate_head(void *x, const float *cos, const float *sin, int64_t half,
                                      const int is_bf16)
{
    const int64_t vhalf = half & ~(int64_t)7;
    for (int64_t i = 0; i < vhalf; i += 8) {
        f32x8 x1 = vload(x, i, is_bf16), x2 = vload(x, half + i, is_bf16);
        f32x8 c = load8(cos + i), s = load8(sin + i);
        vstore(x, i, x1 * c - x2 * s, is_bf16);
        vstore(x, half + i, x2 * c + x1 * s, is_bf16);
    }
    for (int64_t i = vhalf; i < half; i++) {
        float x1 = sload(x, i, is_bf16), x2 = sload(x, half + i, is_bf16);
        sstore(x, i, x1 * cos[i] - x2 * sin[i], is_bf16);
        sstore(x, half + i, x2 * cos[i] + x1 * sin[i], is_bf16);
    }
}

/* Rotates heads [0, heads) of each token; token t's heads start token_stride elements apart
 * (the rows of a fused qkv projection), cos/sin are fp32 [tokens, head_dim / 2]. */
int fleet_rotary(void *x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride,
                 const float *cos, const float *sin, int is_bf16, int num_threads)
{
    const int64_t elem = is_bf16 ? 2 : 4, half = head_dim / 2;
    PARALLEL_FOR(threads_for(tokens * heads * head_dim, num_threads), t, tokens,
        for (int64_t h = 0; h < heads; h++) {
            char *head = (char *)x + (t * token_stride + h * head_dim) * elem;
            if (is_bf16)
                rotate_head(head, cos + t * half, sin + t * half, half, 1);
            else
                rotate_head(head, cos + t * half, sin + t * half, half, 0);
        }
    );
    return 0;
}

/* ---- KV-cache write ----------------------------------------------------------------------- */
/* Copies key/value rows (token t, kv head h at t * token_stride + h * head_stride elements)
 * into fp32 or bf16 caches [num_slots, num_kv_heads, head_dim] of the same dtype at
 * slot_mapping[t]; slots < 0 (padding) are skipped. Returns 1 if a slot is past the cache,
 * before writing anything. */
int fleet_write_kv(const void *key, const void *value, int64_t token_stride_k,
                   int64_t head_stride_k, int64_t token_stride_v, int64_t head_stride_v,
                   const int64_t *slot_mapping, int64_t num_tokens, int64_t num_kv_heads,
                   int64_t head_dim, int64_t num_slots, void *k_cache, void *v_cache,
                   int is_bf16, int num_threads)
{
    for (int64_t t = 0; t < num_tokens; t++)
        if (slot_mapping[t] >= num_slots) return 1;
    const int64_t elem = is_bf16 ? 2 : 4, row_bytes = head_dim * elem;
    PARALLEL_FOR(threads_for(num_tokens * num_kv_heads * head_dim, num_threads), t, num_tokens,
        const int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const int64_t target = (slot * num_kv_heads + h) * row_bytes;
            memcpy((char *)k_cache + target,
                   (const char *)key + (t * token_stride_k + h * head_stride_k) * elem,
                   row_bytes);
            memcpy((char *)v_cache + target,
                   (const char *)value + (t * token_stride_v + h * head_stride_v) * elem,
                   row_bytes);
        }
    );
    return 0;
}

/* ---- argmax of logits rows (greedy sampling) ---------------------------------------------- */
/* out[r] = the first index of row r's largest value (x: rows of n fp32 at `stride` elements),
 * as torch.argmax: a NaN counts as the largest, so a row holding one gives its first NaN.
 * Eight lanes each keep their largest value and its first index; the row's answer is the
 * smallest index among the lanes holding the largest. torch's own argmax reads one value at a
 * time: 57-120 us for a 49,152-token vocabulary on the AVX2 EPYC of docs/benchmarks.md, and
 * 0.9-2.0 ms of a decode step of 32 sequences (here 18 us and 0.15-0.19 ms). */
static int64_t argmax_row(const float *x, int64_t n)
{
    int64_t i = 0, best = 0;
    if (n >= 8) {
        f32x8 top = load8(x);
        i32x8 at = {0, 1, 2, 3, 4, 5, 6, 7}, index = at, nan = (i32x8){0};
        for (i = 8; i + 8 <= n; i += 8) {
            const f32x8 v = load8(x + i);
            index += 8;
            nan |= v != v;
            const i32x8 greater = v > top;
            top = select8(greater, v, top);
            at = (greater & index) | (~greater & at);
        }
        for (int l = 0; l < 8; l++) nan[0] |= nan[l] | (top[l] != top[l]);
        if (nan[0]) { /* the first NaN, as torch */
            for (int64_t j = 0; j < n; j++)
                if (x[j] != x[j]) return j;
        }
        float value = top[0];
        best = at[0];
        for (int l = 1; l < 8; l++)
            if (top[l] > value || (top[l] == value && at[l] < best)) value = top[l], best = at[l];
    }
    for (; i < n; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}

int fleet_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out,
                      int num_threads)
{
    if (rows < 1) return 0;
    const int threads = threads_for(rows * n, num_threads); /* a thread a row at most */
    PARALLEL_FOR(rows < threads ? (int)rows : threads, r, rows,
        out[r] = argmax_row(x + r * stride, n);
    );
    return 0;
}
