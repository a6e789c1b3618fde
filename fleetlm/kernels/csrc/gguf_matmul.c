/* Matrix products on GGUF-quantized weights, for CPUs: y = x W^T with W kept in its GGUF
 * blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K; F32 and F16 too), x and y fp32.
 *
 * Plain C + OpenMP (with vector.h beside it: GCC/Clang vector extensions, so one source builds
 * for AVX2, AVX-512 or NEON as -march=native allows), compiled at first use by
 * fleetlm/kernels/cpu_build.py and called through ctypes by fleetlm/kernels/gguf_linear.py.
 *
 * A task is a tile of ROWS weight rows. Q4_0, Q4_1 and Q8_0 tiles are multiplied straight
 * from their blocks, two or three input rows at a time, each block turned into fp32 in registers
 * (dot_tile_blocks; up to DIRECT_MAX_ROWS input rows). Otherwise each row is dequantized into
 * a per-thread fp32 buffer (a few KiB, so it stays in L1), then every input row is multiplied
 * with the tile, three input rows at a time (3 x 4 accumulators: 7 loads per 12 multiply-adds).
 * Either way the weight is read from memory once per call whatever the number of input rows,
 * and every path sums in one order, so a row's result is the same in any batch.
 *
 * fleet_gguf_matmul_q8 (at the end) is llama.cpp's arithmetic instead: the input quantized to
 * int8 per block and integer dot products, for Q4_0, Q4_1 and Q8_0; in AVX2 builds Q4_0 and
 * Q4_1 go through "wide tiles" (eight weight rows across a vector's lanes).
 *
 * Dequantization follows ggml (llama.cpp) and gguf-py operation by operation in fp32, so the
 * weights multiplied are exactly dequantize(W); only the order of the sums differs from a
 * float matmul. (Every product of a scale and a quantized value below is exact in fp32: an
 * fp16 scale has 11 significant bits, times at most 8 bits of a quantized value or 6 of a
 * sub-block scale, so whether the compiler fuses the following add changes nothing.)
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"
#include "vector.h"

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14 };
enum { OK = 0, ERR_TYPE = 1, ERR_SHAPE = 2, ERR_NO_MEMORY = 3 };
/* Added to Q4_0's, Q4_1's or Q8_0's code: the matrix is in eight-row tiles (fleet_gguf_repack). */
#define PACKED 64
#define WIDE_ROWS 8 /* weight rows per wide tile (and per packed tile): one per 32-bit lane */

#define ROWS 4 /* weight rows per task */
#define PREFETCH_TILES 2 /* the direct path asks for the tile this many tiles ahead */

/* Slice i of `slice` bytes from `ahead`, a cache line at a time: asked for a slice per block
 * of the tile being computed, the tile ahead arrives meanwhile. A prefetch never faults, so a
 * slice past the weight's end costs nothing. */
static ALWAYS_INLINE void prefetch_slice(const uint8_t *ahead, int64_t slice, int64_t i)
{
    for (int64_t p = i * slice; p < (i + 1) * slice; p += 64) __builtin_prefetch(ahead + p);
}
/* A tile's rows of output into y: a copy of constant size where the tile is whole, which the
 * compiler turns into a few vector moves (a call to memcpy per tile was 1% of a decode step:
 * 22,000 tiles a step for the built-in model). */
static ALWAYS_INLINE void store_tile(float *y, const float *out, int64_t rows, int64_t whole)
{
    if (rows == whole && whole == 16) memcpy(y, out, 16 * sizeof(float));
    else if (rows == whole && whole == 8) memcpy(y, out, 8 * sizeof(float));
    else if (rows == whole && whole == 4) memcpy(y, out, 4 * sizeof(float));
    else memcpy(y, out, (size_t)rows * sizeof(float));
}

/* Input rows per pass over a tile's blocks: their accumulators, the rows' values and one
 * block must fit the vector registers (AVX-512 has 32, AVX2 16). Measured on the model's
 * shapes with AVX-512: 3 rows against 2 cut 8 rows from 18.2 to 15.7 ms, 32 from 70 to 57. */
#ifdef __AVX512F__
#define DIRECT_ROWS 3
#else
#define DIRECT_ROWS 2
#endif
/* Up to how many input rows Q4_0 / Q4_1 / Q8_0 skip the dequantized buffer. Measured on the
 * built-in model's shapes (docs/benchmarks.md): with AVX-512's 32 vector registers the direct
 * path is faster at every batch (1.4x at 1 row, 1.2x at 128); an AVX2 build (16 registers)
 * is faster direct up to 8 rows and 5-10% slower from 32. */
#ifdef __AVX512F__
#define DIRECT_MAX_ROWS INT64_MAX
#else
#define DIRECT_MAX_ROWS 16
#endif
#define QK 32  /* elements per Q4_0 / Q4_1 / Q8_0 block */
#define QK_K 256

#if defined(__AVX2__)
#include <immintrin.h>

/* 8 bytes, zero- or sign-extended, as 8 fp32 values (exact: at most 8 bits each). */
static ALWAYS_INLINE f32x8 u8_to_f32x8(__m128i bytes)
{
    return (f32x8)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

static ALWAYS_INLINE f32x8 i8_to_f32x8(const int8_t *p)
{
    return (f32x8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* The 32 4-bit values of a Q4_0 / Q4_1 block as fp32: element l is the low nibble of byte l,
 * element l + 16 its high nibble. */
static ALWAYS_INLINE void nibbles_to_f32(const uint8_t *qs, f32x8 out[4])
{
    const __m128i v = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0xF);
    const __m128i low = _mm_and_si128(v, mask), high = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    out[0] = u8_to_f32x8(low);
    out[1] = u8_to_f32x8(_mm_srli_si128(low, 8));
    out[2] = u8_to_f32x8(high);
    out[3] = u8_to_f32x8(_mm_srli_si128(high, 8));
}
#else /* portable: what the compiler makes of plain loops */
static ALWAYS_INLINE f32x8 i8_to_f32x8(const int8_t *p)
{
    f32x8 out;
    for (int l = 0; l < 8; l++) out[l] = (float)p[l];
    return out;
}

static ALWAYS_INLINE void nibbles_to_f32(const uint8_t *qs, f32x8 out[4])
{
    for (int l = 0; l < 8; l++) {
        out[0][l] = (float)(qs[l] & 0xF);
        out[1][l] = (float)(qs[l + 8] & 0xF);
        out[2][l] = (float)(qs[l] >> 4);
        out[3][l] = (float)(qs[l + 8] >> 4);
    }
}
#endif

static ALWAYS_INLINE float fp16_to_fp32(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, sizeof h);
    _Float16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
}

/* Bytes of one block of the 32-element types. */
static ALWAYS_INLINE int64_t small_block_bytes(int type)
{
    return type == T_Q4_0 ? 2 + QK / 2 : type == T_Q4_1 ? 4 + QK / 2 : 2 + QK;
}

/* Elements per block and bytes per block of each type; 0 for an unknown type. */
static int block_shape(int type, int64_t *elements, int64_t *bytes)
{
    switch (type) {
    case T_F32: *elements = 1; *bytes = 4; return 1;
    case T_F16: *elements = 1; *bytes = 2; return 1;
    case T_Q4_0:
    case T_Q4_1:
    case T_Q8_0: *elements = QK; *bytes = small_block_bytes(type); return 1;
    case T_Q4_K: *elements = QK_K; *bytes = 4 + 12 + QK_K / 2; return 1;
    case T_Q6_K: *elements = QK_K; *bytes = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2; return 1;
    default: return 0;
    }
}

/* Scale and min of sub-block j of a Q4_K super-block (ggml's get_scale_min_k4). */
static void scale_min_k4(int j, const uint8_t *q, int *scale, int *min)
{
    if (j < 4) {
        *scale = q[j] & 63;
        *min = q[j + 4] & 63;
    } else {
        *scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* One Q4_0, Q4_1 or Q8_0 block at `src` as 4 x 8 fp32 values (elements 8j..8j+7 in out[j]). */
static ALWAYS_INLINE void small_block_to_f32(const uint8_t *src, int type, f32x8 out[4])
{
    const float d = fp16_to_fp32(src);
    if (type == T_Q8_0) {
        for (int j = 0; j < 4; j++) out[j] = i8_to_f32x8((const int8_t *)(src + 2) + 8 * j) * d;
        return;
    }
    f32x8 q[4];
    nibbles_to_f32(src + (type == T_Q4_0 ? 2 : 4), q);
    if (type == T_Q4_0) {
        for (int j = 0; j < 4; j++) out[j] = (q[j] - 8.0f) * d;
    } else {
        const float m = fp16_to_fp32(src + 2);
        for (int j = 0; j < 4; j++) out[j] = q[j] * d + m;
    }
}

/* One row of `k` elements from its blocks at `src` into `out`. */
static void dequantize_row(const uint8_t *src, int64_t k, int type, float *restrict out)
{
    switch (type) {
    case T_F32:
        memcpy(out, src, (size_t)k * sizeof(float));
        return;
    case T_F16:
        for (int64_t i = 0; i < k; i++) out[i] = fp16_to_fp32(src + 2 * i);
        return;
    case T_Q4_0:
    case T_Q4_1:
    case T_Q8_0: {
        const int64_t bytes = small_block_bytes(type);
        for (int64_t b = 0; b < k / QK; b++, src += bytes, out += QK) {
            f32x8 v[4];
            small_block_to_f32(src, type, v);
            for (int j = 0; j < 4; j++) store8(out + 8 * j, v[j]);
        }
        return;
    }
    case T_Q4_K:
        for (int64_t b = 0; b < k / QK_K; b++, src += 144) {
            const float d = fp16_to_fp32(src), dmin = fp16_to_fp32(src + 2);
            const uint8_t *scales = src + 4, *q = src + 16;
            for (int j = 0; j < QK_K / 64; j++, q += 32, out += 64) {
                int sc, mn;
                scale_min_k4(2 * j, scales, &sc, &mn);
                const float d1 = d * (float)sc, m1 = dmin * (float)mn;
                scale_min_k4(2 * j + 1, scales, &sc, &mn);
                const float d2 = d * (float)sc, m2 = dmin * (float)mn;
                for (int l = 0; l < 32; l++) {
                    out[l] = d1 * (float)(q[l] & 0xF) - m1;
                    out[l + 32] = d2 * (float)(q[l] >> 4) - m2;
                }
            }
        }
        return;
    case T_Q6_K:
        for (int64_t b = 0; b < k / QK_K; b++, src += 210) {
            const uint8_t *ql = src, *qh = src + 128;
            const int8_t *sc = (const int8_t *)(src + 192);
            const float d = fp16_to_fp32(src + 208);
            for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, out += 128) {
                for (int is = 0; is < 2; is++) { /* 16 values per sub-block scale */
                    for (int l = 16 * is; l < 16 * is + 16; l++) {
                        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                        out[l] = d * (float)sc[is] * (float)q1;
                        out[l + 32] = d * (float)sc[is + 2] * (float)q2;
                        out[l + 64] = d * (float)sc[is + 4] * (float)q3;
                        out[l + 96] = d * (float)sc[is + 6] * (float)q4;
                    }
                }
            }
        }
        return;
    }
}

/* y[j][r] = <x_j, w_r> for NX input rows x_j = x + j * k and `rows` weight rows
 * w_r = w + r * k. Called with constant NX and rows, so that the NX x rows accumulators stay
 * in registers (3 x 4: 12 accumulators, 7 loads per 12 multiply-adds). */
static ALWAYS_INLINE void dot_tile(const float *x, int nx, const float *w, int64_t k, int rows,
                                   float y[][ROWS])
{
    f32x8 a[3][ROWS];
    for (int j = 0; j < nx; j++)
        for (int r = 0; r < rows; r++) a[j][r] = splat8(0.0f);
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        f32x8 u[3];
        for (int j = 0; j < nx; j++) u[j] = load8(x + j * k + i);
        for (int r = 0; r < rows; r++) {
            const f32x8 wr = load8(w + r * k + i);
            for (int j = 0; j < nx; j++) a[j][r] = fma8(u[j], wr, a[j][r]);
        }
    }
    for (int j = 0; j < nx; j++) {
        for (int r = 0; r < rows; r++) {
            float s = hsum8(a[j][r]);
            for (int64_t l = i; l < k; l++) s += x[j * k + l] * w[r * k + l];
            y[j][r] = s;
        }
    }
}

/* dot_tile for the 32-element types read straight from their blocks: each block of the `rows`
 * weight rows at w + r * row_bytes goes to registers and into the products at once, and the
 * bytes PREFETCH_TILES tiles ahead are requested meanwhile, a slice per block (the interleaved
 * reads of four rows defeat the hardware prefetcher: without this the lm_head ran at a third
 * of the buffered path's bandwidth). The sums run in dot_tile's order (per lane, 8 elements
 * at a time from the first, fused multiply-adds), so the result is bit for bit the buffered
 * path's and a row's result does not depend on the rows batched with it. */
static ALWAYS_INLINE void dot_tile_blocks(const float *x, int nx, const uint8_t *w,
                                          int64_t row_bytes, int64_t k, int type, int rows,
                                          float y[][ROWS])
{
    const int64_t bytes = small_block_bytes(type);
    f32x8 a[DIRECT_ROWS][ROWS];
    for (int j = 0; j < nx; j++)
        for (int r = 0; r < rows; r++) a[j][r] = splat8(0.0f);
    const int64_t blocks = k / QK, ahead = (rows * row_bytes + blocks - 1) / blocks;
    for (int64_t b = 0; b < blocks; b++) {
        prefetch_slice(w + PREFETCH_TILES * rows * row_bytes, ahead, b);
        f32x8 u[DIRECT_ROWS][4];
        for (int j = 0; j < nx; j++)
            for (int l = 0; l < 4; l++) u[j][l] = load8(x + j * k + b * QK + 8 * l);
        for (int r = 0; r < rows; r++) {
            f32x8 v[4];
            small_block_to_f32(w + r * row_bytes + b * bytes, type, v);
            for (int l = 0; l < 4; l++)
                for (int j = 0; j < nx; j++) a[j][r] = fma8(u[j][l], v[l], a[j][r]);
        }
    }
    for (int j = 0; j < nx; j++)
        for (int r = 0; r < rows; r++) y[j][r] = hsum8(a[j][r]);
}

/* fleet_gguf_matmul for a Q4_0, Q4_1 or Q8_0 matrix without the buffer: per tile, the input
 * rows DIRECT_ROWS at a time. */
static ALWAYS_INLINE void direct_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w,
                                        int64_t n, int type, float *y, int num_threads)
{
    const int64_t row_bytes = k / QK * small_block_bytes(type);
    const int64_t num_tiles = (n + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_tiles > 1)
    for (int64_t t = 0; t < num_tiles; t++) {
        const int64_t n0 = t * ROWS;
        const uint8_t *tile = w + n0 * row_bytes;
        float out[DIRECT_ROWS][ROWS];
        if (n - n0 >= ROWS) {
            for (int64_t i = 0; i < m; i += DIRECT_ROWS) {
                const int nx = (int)(m - i < DIRECT_ROWS ? m - i : DIRECT_ROWS);
                const float *xi = x + i * k; /* constant row counts: unrolled, in registers */
                if (nx == DIRECT_ROWS)
                    dot_tile_blocks(xi, DIRECT_ROWS, tile, row_bytes, k, type, ROWS, out);
#if DIRECT_ROWS > 2
                else if (nx == 2)
                    dot_tile_blocks(xi, 2, tile, row_bytes, k, type, ROWS, out);
#endif
                else
                    dot_tile_blocks(xi, 1, tile, row_bytes, k, type, ROWS, out);
                for (int j = 0; j < nx; j++) memcpy(y + (i + j) * n + n0, out[j], sizeof out[j]);
            }
        } else { /* the last, ragged tile: one weight row and one input row at a time */
            for (int r = 0; r < n - n0; r++)
                for (int j = 0; j < m; j++) {
                    dot_tile_blocks(x + j * k, 1, tile + r * row_bytes, row_bytes, k, type, 1,
                                    out);
                    y[j * n + n0 + r] = out[0][0];
                }
        }
    }
}

/* w: n rows of k elements in GGUF type `type`, row after row. out: n x k fp32. */
int fleet_gguf_dequantize(const uint8_t *w, int64_t n, int64_t k, int type, float *out,
                          int num_threads)
{
    int64_t elements, bytes;
    if (!block_shape(type, &elements, &bytes)) return ERR_TYPE;
    if (k % elements) return ERR_SHAPE;
    const int64_t row_bytes = k / elements * bytes;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (n >= 64)
    for (int64_t r = 0; r < n; r++) dequantize_row(w + r * row_bytes, k, type, out + r * k);
    return OK;
}

/* out (count x k, fp32): rows ids[0..count) of w (n rows of k elements in GGUF type `type`):
 * an embedding lookup in one call. Returns ERR_SHAPE (nothing written) for an id outside
 * 0..n-1. */
static void packed_row_block(const uint8_t *w, int64_t k, int type, int64_t row, int64_t b,
                             uint8_t *block);

int fleet_gguf_dequantize_rows(const uint8_t *w, int64_t n, int64_t k, int type,
                               const int64_t *ids, int64_t count, float *out, int num_threads)
{
    const int base = type & ~PACKED, packed = type & PACKED;
    int64_t elements, bytes;
    if (!block_shape(base, &elements, &bytes) || (packed && elements != QK)) return ERR_TYPE;
    if (k % elements || (packed && n % WIDE_ROWS)) return ERR_SHAPE;
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= n) return ERR_SHAPE;
    const int64_t row_bytes = k / elements * bytes;
    if (packed) { /* each block of the row back in GGUF's layout, then as any block */
        PARALLEL_FOR(count >= 64 ? num_threads : 1, i, count,
            for (int64_t b = 0; b < k / QK; b++) {
                uint8_t block[2 + QK];
                packed_row_block(w, k, base, ids[i], b, block);
                dequantize_row(block, QK, base, out + i * k + b * QK);
            }
        );
        return OK;
    }
    PARALLEL_FOR(count >= 64 ? num_threads : 1, i, count,
        dequantize_row(w + ids[i] * row_bytes, k, type, out + i * k);
    );
    return OK;
}

/* y (m x n, fp32) = x (m x k, fp32) times the transpose of w (n x k in GGUF type `type`). */
int fleet_gguf_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                      int type, float *y, int num_threads)
{
    int64_t elements, bytes;
    if (!block_shape(type, &elements, &bytes)) return ERR_TYPE;
    if (k % elements) return ERR_SHAPE;
    if (m >= 1 && m <= DIRECT_MAX_ROWS) {
        switch (type) { /* constant types, so that each gets its own unrolled loop */
        case T_Q4_0: direct_matmul(x, m, k, w, n, T_Q4_0, y, num_threads); return OK;
        case T_Q4_1: direct_matmul(x, m, k, w, n, T_Q4_1, y, num_threads); return OK;
        case T_Q8_0: direct_matmul(x, m, k, w, n, T_Q8_0, y, num_threads); return OK;
        }
    }
    const int64_t row_bytes = k / elements * bytes;
    const int64_t num_tiles = (n + ROWS - 1) / ROWS;
    int status = OK;
#pragma omp parallel num_threads(num_threads) if (num_tiles > 1)
    {
        float *buffer = malloc((size_t)(ROWS * k) * sizeof(float));
        float tile_out[ROWS][ROWS]; /* [x row][weight row]; ragged tile: [weight row][0] */
        if (buffer == NULL) {
#pragma omp atomic write
            status = ERR_NO_MEMORY;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tiles; t++) {
            if (buffer == NULL) continue;
            const int64_t n0 = t * ROWS;
            const int rows = (int)(n - n0 < ROWS ? n - n0 : ROWS);
            for (int r = 0; r < rows; r++)
                dequantize_row(w + (n0 + r) * row_bytes, k, type, buffer + r * k);
            int64_t i = 0;
            if (rows == ROWS) {
                for (; i + 3 <= m; i += 3) {
                    dot_tile(x + i * k, 3, buffer, k, ROWS, tile_out);
                    for (int j = 0; j < 3; j++)
                        memcpy(y + (i + j) * n + n0, tile_out[j], sizeof tile_out[j]);
                }
                const int rest = (int)(m - i); /* 0, 1 or 2 input rows */
                if (rest == 2) dot_tile(x + i * k, 2, buffer, k, ROWS, tile_out);
                if (rest == 1) dot_tile(x + i * k, 1, buffer, k, ROWS, tile_out);
                for (int j = 0; j < rest; j++)
                    memcpy(y + (i + j) * n + n0, tile_out[j], sizeof tile_out[j]);
            } else { /* the last, ragged tile */
                for (; i < m; i++) {
                    for (int r = 0; r < rows; r++)
                        dot_tile(x + i * k, 1, buffer + r * k, k, 1, tile_out + r);
                    for (int r = 0; r < rows; r++) y[i * n + n0 + r] = tile_out[r][0];
                }
            }
        }
        free(buffer);
    }
    return status;
}

/* ---- Integer dot products: Q4_0, Q4_1 and Q8_0 times int8 activations --------------------
 * llama.cpp's arithmetic for these types: each input row is quantized per 32-element block
 * (d = max|x| / 127, q = round-half-even(x / d): the q8_0 / q8_1 rounding, with d kept in
 * fp32), and a weight block times an input block is summed exactly in integers before one
 * fp32 multiply-add by the two blocks' scales. A weight block's offset (Q4_0's -8, Q4_1's
 * min) multiplies the input block's sum, d * sum(q), once per block. Blocks are read as
 * bytes, never turned into fp32.
 *
 * A tile's four weight rows go through together: their four integer block products are
 * reduced into one vector (lane r: row r's block) with horizontal adds, so one conversion
 * and one multiply-add per input row and block cover all four rows, and one accumulator per
 * input row leaves AVX2's 16 registers for the decoded blocks. Every build forms the same
 * integer sums (AVX2's vpmaddubsw, VNNI's vpdpbusd, plain loops), and a row's result does
 * not depend on the rows batched with it. On the AVX2 EPYC of docs/benchmarks.md: the
 * model's Q4_1 layers in 5.8 ms at one input row (7.8 with fp32 activations) and 20 ms at
 * eight (35). AVX2 builds now take these four-row tiles for Q8_0 in GGUF's rows at one input
 * row only (and for all three types with -DFLEET_NO_WIDE_TILES); the wide tiles further below
 * take the rest and form the same sums in the same order: per block one integer, one
 * multiply-add by d_w * d_x, then one by the offset. */

#define XQMAX 127
#ifndef Q8_ROWS
#define Q8_ROWS 4 /* input rows per pass: one accumulator each, beside four decoded blocks */
#endif

typedef struct {
    float d;      /* the block's scale */
    float s;      /* d * sum(q), for the weights' offsets */
    int8_t q[QK]; /* round-half-even(x / d), in [-127, 127] */
} xblock;

/* One input row of k elements into k / QK blocks (a block of zeros gets d = 0, q = 0). With
 * AVX2 eight elements at a time: the same division, the same round-half-even and the same
 * clamp, so the same blocks. */
static void quantize_row_blocks(const float *x, int64_t k, xblock *out)
{
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.0f), lowest = _mm256_set1_ps(-XQMAX),
                 highest = _mm256_set1_ps(XQMAX);
    for (int64_t b = 0; b < k / QK; b++, x += QK, out++) {
        __m256 v[4], amax8 = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + 8 * i);
            amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 amax4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
        amax4 = _mm_max_ps(amax4, _mm_movehl_ps(amax4, amax4));
        amax4 = _mm_max_ss(amax4, _mm_shuffle_ps(amax4, amax4, 1));
        const float d = _mm_cvtss_f32(amax4) / (float)XQMAX, divisor = d > 0.0f ? d : 1.0f;
        const __m256 divisor8 = _mm256_set1_ps(divisor);
        __m256i q[4], sum8 = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            const __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], divisor8),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lowest), highest));
            sum8 = _mm256_add_epi32(sum8, q[i]);
        }
        /* packs interleave 128-bit lanes: bytes come out as groups of four of q0 q1 q2 q3 (low
         * halves), then the high halves; the permute restores element order */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                                 _mm256_packs_epi32(q[2], q[3]));
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        _mm256_storeu_si256((__m256i *)out->q, _mm256_permutevar8x32_epi32(bytes, order));
        __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum8),
                                     _mm256_extracti128_si256(sum8, 1));
        sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, _MM_SHUFFLE(1, 0, 3, 2)));
        sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, _MM_SHUFFLE(2, 3, 0, 1)));
        out->d = d;
        out->s = d * (float)_mm_cvtsi128_si32(sum4);
    }
#else
    for (int64_t b = 0; b < k / QK; b++, x += QK, out++) {
        float amax = 0.0f;
        for (int l = 0; l < QK; l++) amax = fmaxf(amax, fabsf(x[l]));
        const float d = amax / (float)XQMAX, divisor = d > 0.0f ? d : 1.0f;
        int sum = 0;
        for (int l = 0; l < QK; l++) {
            const int q = (int)fminf(fmaxf(nearbyintf(x[l] / divisor), -XQMAX), XQMAX);
            out->q[l] = (int8_t)q;
            sum += q;
        }
        out->d = d;
        out->s = d * (float)sum;
    }
#endif
}

/* Four weight blocks (one per row of a tile) times one input block: lane r (r < 4) is the
 * integer dot product of row r's block with the input's, as fp32 (exact: at most 32 * 128 *
 * 127), lanes 4..7 zero. Q4 blocks are their nibbles, 0..15, unsigned; Q8_0's are signed
 * bytes. */
#if defined(__AVX2__)
typedef __m256i qbytes; /* a block's 32 quantized values, one per byte */

static ALWAYS_INLINE qbytes load_qbytes(const void *p) { return _mm256_loadu_si256(p); }

/* A Q4_0 / Q4_1 block's 32 nibbles as bytes 0..15 in element order (the low nibbles of its 16
 * bytes are elements 0..15, the high nibbles 16..31). */
static ALWAYS_INLINE qbytes nibble_bytes(const uint8_t *qs)
{
    const __m128i v = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0xF);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

/* Lane l: the sum of products 4l..4l+3 of unsigned bytes u and signed bytes s. vpmaddubsw's
 * int16 pairs never saturate here: a pair is at most 2 * 128 * 127 (Q8_0's |w| may be 128). */
static ALWAYS_INLINE __m256i quad_sums(qbytes u, qbytes s)
{
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static ALWAYS_INLINE __m256i block_sums(qbytes w, qbytes x, int is_signed)
{   /* signed weights: |w| times x carrying w's sign */
    return is_signed ? quad_sums(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
                     : quad_sums(w, x);
}

/* Lanes r (the 128-bit half of elements 0..15) and r + 4 (16..31) added: lane r of the result,
 * with zeros above. */
static ALWAYS_INLINE f32x8 whole_blocks(__m256i halves)
{
    const __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(halves),
                                       _mm256_extracti128_si256(halves, 1));
    return (f32x8)_mm256_cvtepi32_ps(_mm256_zextsi128_si256(sums));
}

static ALWAYS_INLINE f32x8 tile_dots(const qbytes w[ROWS], qbytes x, int is_signed)
{
#if !defined(__AVX512VNNI__) && !defined(__AVXVNNI__)
    if (!is_signed) { /* nibbles: int16 sums of 8 products (at most 8 * 15 * 127) do not wrap,
                       * so the pairs add as int16 and widen once */
        const __m256i p01 = _mm256_hadd_epi16(_mm256_maddubs_epi16(w[0], x),
                                              _mm256_maddubs_epi16(w[1], x));
        const __m256i p23 = _mm256_hadd_epi16(_mm256_maddubs_epi16(w[2], x),
                                              _mm256_maddubs_epi16(w[3], x));
        return whole_blocks(_mm256_madd_epi16(_mm256_hadd_epi16(p01, p23), _mm256_set1_epi16(1)));
    }
#endif
    const __m256i s01 = _mm256_hadd_epi32(block_sums(w[0], x, is_signed),
                                          block_sums(w[1], x, is_signed));
    const __m256i s23 = _mm256_hadd_epi32(block_sums(w[2], x, is_signed),
                                          block_sums(w[3], x, is_signed));
    return whole_blocks(_mm256_hadd_epi32(s01, s23));
}
#else /* portable: the same sums from plain loops */
typedef struct { int8_t v[QK]; } qbytes;

static ALWAYS_INLINE qbytes load_qbytes(const void *p)
{
    qbytes out;
    memcpy(out.v, p, QK);
    return out;
}

static ALWAYS_INLINE qbytes nibble_bytes(const uint8_t *qs)
{
    qbytes out;
    for (int l = 0; l < QK / 2; l++) {
        out.v[l] = (int8_t)(qs[l] & 0xF);
        out.v[l + QK / 2] = (int8_t)(qs[l] >> 4);
    }
    return out;
}

static ALWAYS_INLINE f32x8 tile_dots(const qbytes w[ROWS], qbytes x, int is_signed)
{
    (void)is_signed; /* nibbles are stored as non-negative int8 */
    f32x8 out = splat8(0.0f);
    for (int r = 0; r < ROWS; r++) {
        int32_t s = 0;
        for (int e = 0; e < QK; e++) s += (int32_t)w[r].v[e] * (int32_t)x.v[e];
        out[r] = (float)s;
    }
    return out;
}
#endif

/* The fp16 scales at the start of block b of each of the four rows, as fp32: *dw gets each
 * row's d (byte 0) in lanes r and r + 4; *mins, where asked for, Q4_1's m (byte 2) in lanes
 * 0..3 and 0 in 4..7. With F16C one conversion takes all eight halves (the four rows' first
 * four bytes: d, and m or the first quantized bytes) and two permutes sort them; otherwise
 * one at a time. Either way the conversion is exact. */
static ALWAYS_INLINE void tile_scales(const uint8_t *const rows[ROWS], int64_t b, int64_t bytes,
                                      f32x8 *dw, f32x8 *mins)
{
#if defined(__AVX2__) && defined(__F16C__)
    int32_t heads[ROWS];
    for (int r = 0; r < ROWS; r++) memcpy(&heads[r], rows[r] + b * bytes, sizeof heads[r]);
    const __m256 halves = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)heads));
    *dw = (f32x8)_mm256_permutevar8x32_ps(halves, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
    if (mins)
        *mins = (f32x8)_mm256_blend_ps(
            _mm256_permutevar8x32_ps(halves, _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7)),
            _mm256_setzero_ps(), 0xF0);
#else
    for (int r = 0; r < ROWS; r++) {
        (*dw)[r] = (*dw)[r + 4] = fp16_to_fp32(rows[r] + b * bytes);
        if (mins) {
            (*mins)[r] = fp16_to_fp32(rows[r] + b * bytes + 2);
            (*mins)[r + 4] = 0.0f;
        }
    }
#endif
}

/* Block b of a tile's four weight rows, decoded: the quantized values, each row's d in lanes
 * r and r + 4, and the offsets that multiply the input block's d * sum(q) (Q4_0's -8 * d,
 * Q4_1's min, in lanes 0..3; none for Q8_0). */
typedef struct {
    qbytes w[ROWS];
    f32x8 dw, c;
} tile_block;

static ALWAYS_INLINE void decode_tile_block(const uint8_t *const rows[ROWS], int64_t b,
                                            int type, tile_block *out)
{
    const int64_t bytes = small_block_bytes(type);
    const f32x8 low_minus_8 = {-8.0f, -8.0f, -8.0f, -8.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = 0; r < ROWS; r++)
        out->w[r] = type == T_Q8_0 ? load_qbytes(rows[r] + b * bytes + 2)
                                   : nibble_bytes(rows[r] + b * bytes + (type == T_Q4_0 ? 2 : 4));
    f32x8 mins = splat8(0.0f);
    tile_scales(rows, b, bytes, &out->dw, type == T_Q4_1 ? &mins : NULL);
    out->c = type == T_Q4_0 ? out->dw * low_minus_8 : mins;
}

/* a[j] += block b's products with input row j (x + j * blocks), for j < nx. */
static ALWAYS_INLINE void accumulate_block(const tile_block *tb, const xblock *x, int nx,
                                           int64_t blocks, int64_t b, int type, f32x8 a[])
{
    for (int j = 0; j < nx; j++) {
        const xblock *xb = x + j * blocks + b;
        a[j] = fma8(tile_dots(tb->w, load_qbytes(xb->q), type == T_Q8_0), tb->dw * splat8(xb->d),
                    a[j]);
    }
    if (type != T_Q8_0)
        for (int j = 0; j < nx; j++) a[j] = fma8(tb->c, splat8(x[j * blocks + b].s), a[j]);
}

/* y[j][r] = <x_j, w_r> for nx quantized input rows (x + j * blocks) and the four weight rows
 * at rows[r] (a ragged tile repeats its last row), or their blocks already decoded into
 * `decoded` (not NULL). One vector accumulator per input row: lane r holds row r's blocks,
 * scaled, and the blocks' offsets times the input blocks' d * sum(q). Few accumulators
 * leave AVX2's 16 registers for the four decoded blocks. Either way the same operations in
 * the same order, so a row's result does not depend on which. */
static ALWAYS_INLINE void dot_tile_q8(const xblock *x, int nx, const uint8_t *const rows[ROWS],
                                      const tile_block *decoded, int64_t row_bytes,
                                      int64_t blocks, int type, float y[][ROWS])
{
    f32x8 a[Q8_ROWS];
    for (int j = 0; j < nx; j++) a[j] = splat8(0.0f);
    const int64_t ahead = (ROWS * row_bytes + blocks - 1) / blocks;
    for (int64_t b = 0; b < blocks; b++) {
        if (decoded) {
            accumulate_block(&decoded[b], x, nx, blocks, b, type, a);
            continue;
        }
        prefetch_slice(rows[0] + PREFETCH_TILES * ROWS * row_bytes, ahead, b);
        tile_block tb;
        decode_tile_block(rows, b, type, &tb);
        accumulate_block(&tb, x, nx, blocks, b, type, a);
    }
    for (int j = 0; j < nx; j++)
        for (int r = 0; r < ROWS; r++) y[j][r] = a[j][r];
}

/* Tiles [begin, end) of fleet_gguf_matmul_q8 on quantized input rows: per tile of four weight
 * rows, the input rows Q8_ROWS at a time (direct_matmul's layout). With more input rows than
 * one pass takes, the tile's blocks are decoded once into the thread's buffer (a few KiB: it
 * stays in L1) and every pass reads them there. */
static ALWAYS_INLINE int direct_tiles_q8(const xblock *x, int64_t m, int64_t k,
                                         const uint8_t *w, int64_t n, int type, float *y,
                                         int64_t begin, int64_t end)
{
    const int64_t blocks = k / QK, row_bytes = blocks * small_block_bytes(type);
    const int is_decoded_once = m > Q8_ROWS;
    tile_block *decoded = NULL;
    if (is_decoded_once) {
        size_t size = ((size_t)blocks * sizeof(tile_block) + 63) / 64 * 64;
        decoded = aligned_alloc(64, size);
        if (!decoded) return ERR_NO_MEMORY;
    }
    for (int64_t t = begin; t < end; t++) {
        const int64_t n0 = t * ROWS, rows_here = n - n0 < ROWS ? n - n0 : ROWS;
        const uint8_t *rows[ROWS];
        for (int r = 0; r < ROWS; r++) /* a ragged tile repeats its last row */
            rows[r] = w + (n0 + (r < rows_here ? r : rows_here - 1)) * row_bytes;
        if (decoded) {
            const int64_t ahead = (ROWS * row_bytes + blocks - 1) / blocks;
            for (int64_t b = 0; b < blocks; b++) {
                prefetch_slice(rows[0] + PREFETCH_TILES * ROWS * row_bytes, ahead, b);
                decode_tile_block(rows, b, type, &decoded[b]);
            }
        }
        float out[Q8_ROWS][ROWS];
        for (int64_t i = 0; i < m; i += Q8_ROWS) {
            const int nx = (int)(m - i < Q8_ROWS ? m - i : Q8_ROWS);
            const xblock *xi = x + i * blocks;
            if (nx == Q8_ROWS)
                dot_tile_q8(xi, Q8_ROWS, rows, decoded, row_bytes, blocks, type, out);
            else if (nx == 3)
                dot_tile_q8(xi, 3, rows, decoded, row_bytes, blocks, type, out);
            else if (nx == 2)
                dot_tile_q8(xi, 2, rows, decoded, row_bytes, blocks, type, out);
            else
                dot_tile_q8(xi, 1, rows, decoded, row_bytes, blocks, type, out);
            for (int j = 0; j < nx; j++)
                store_tile(y + (i + j) * n + n0, out[j], rows_here, ROWS);
        }
    }
    free(decoded);
    return OK;
}

/* ---- Wide tiles: eight weight rows across a vector, for many input rows (AVX2) -------------
 * The tiles above reduce four rows' block products with horizontal adds, which costs as much
 * again as the products themselves; worth it for a decode step's few rows, where the weight's
 * bytes are the limit, not for a prefill's hundreds, where the arithmetic is. Here a tile is
 * eight weight rows, decoded once per call into a per-thread buffer (a few KiB, in L1) with
 * the rows interleaved by four-element groups: byte 4r + e of group g is element 4g + e of
 * row r. One vpmaddubsw of a group with four bytes of an input block broadcast to every lane
 * then leaves row r's products in lane r, and the block's eight groups add up without any
 * horizontal step: an int16 sum of 16 products of a nibble (at most 15) and an input byte
 * (127) does not wrap.
 *
 * The sums are those of dot_tile_q8, in its order: per block an exact integer, converted and
 * multiplied by d_w * d_x into the row's accumulator, then the weights' offsets times the
 * input block's d * sum(q). (Until 2026-12-06 both kernels kept each half block apart, in a
 * second accumulator: one conversion, multiply and multiply-add more per block, which the
 * int16 sums never needed.) So a product is bit-equal whichever kernel runs it, and a row's
 * result is the same in any batch.
 *
 * Q8_0's signed products do not fit int16 sums, so each pair widens at once, and vpmaddubsw
 * takes the weights' magnitudes against input bytes carrying the weights' signs (exact; both
 * decoded once per call). Built so before, with one input row a pass and GCC free to
 * schedule, a Q8_0 wide tile was no faster than the four-row tiles (the LM head at 32 rows
 * in 13.5 against 13.6 ms); with two rows a pass and the groups in order, the model's LM
 * head took 8.4 against 13.9 ms at 32 rows, 2.74 against 3.74 at eight, 1.65 against 2.01 at
 * four and 1.18 against 1.21 at two (benchmarks/gguf_products.py, 2026-12-06, AVX2 EPYC);
 * at one row, where the weight's bytes are the limit, the four-row tiles read GGUF's rows
 * without the transpose, and a packed Q8_0 matrix (PACKED_Q8_D) is read in place. */
/* A pass multiplies WIDE_TILES tiles by WIDE_X_ROWS input rows, with one accumulator and one
 * integer sum per pair, so that each broadcast of an input group feeds both tiles and each
 * load of a tile's group feeds three rows: a pass is bound by its loads (two 256-bit loads a
 * cycle on Zen 3), not by its products. With two accumulators per pair (the halves apart) two
 * tiles of one row measured best; with one, benchmarks/kernel_ab.py on the AVX2 EPYC
 * (2026-12-06, every build alternating in one process; 256-token prefill / decode step of 32)
 * gave against that: 3 rows x 2 tiles -11.7% / -8.5%, 2 x 3 -11.3% / -7.0%, 2 x 2 -8.8% /
 * -5.7%, 4 x 2 -8.5% / -5.7%, 5 x 1 -10.2% / -5.1%, 4 x 1 -7.7% / -4.3%; 1 x 3 -3.7% /
 * -2.1% and 1 x 2 (the old shape) -3.3 to -5.8% / -0.7 to -3.5%. */
#ifndef WIDE_X_ROWS
#define WIDE_X_ROWS 3
#endif
#ifndef WIDE_TILES
#define WIDE_TILES 2
#endif
#ifndef WIDE_Q8_X_ROWS /* Q8_0's pass: its sums and accumulators fill AVX2's registers at two */
#define WIDE_Q8_X_ROWS 2
#endif
#ifndef WIDE_Q8_MIN_ROWS /* below this many input rows Q8_0 keeps the four-row tiles */
#define WIDE_Q8_MIN_ROWS 2
#endif
#define WIDE_TILE_ROWS (WIDE_ROWS * WIDE_TILES)
/* Up to this many input rows (one pass) a packed matrix is read in place, each block decoded
 * as it is multiplied, instead of a task's blocks decoded into the buffer first: with nothing
 * to reuse, the buffer's stores and loads only cost. The next task's bytes are asked for a
 * slice per block meanwhile. A decode step of one sequence (benchmarks/kernel_ab.py, AVX2
 * EPYC, 2026-12-06, alternated): in place 7.16 ms, buffered 8.33, in place without asking
 * ahead 8.54; GGUF's rows (decode_wide_block's transposes) 9.27. */
#ifndef WIDE_IN_PLACE_ROWS
#define WIDE_IN_PLACE_ROWS WIDE_X_ROWS
#endif

#if WIDE_X_ROWS > 4 || WIDE_Q8_X_ROWS > 3 || WIDE_IN_PLACE_ROWS > WIDE_X_ROWS
#error "the wide passes' dispatch takes at most four input rows (Q8_0: three), in place one pass"
#endif

/* Q4_0 / Q4_1 repacked at load into eight-row tiles (type code + PACKED): the bytes of rows
 * 8t..8t+7, in the same place, rearranged so that a wide tile's block is one run of bytes in
 * its layout. Block b of tile t is WIDE_ROWS * small_block_bytes(type) bytes: four 32-byte
 * vectors, where dword r of vector g is bytes 4g..4g+3 of row r's nibbles (low nibbles:
 * elements 4g..4g+3, group g; high nibbles: group g + 4), then the eight rows' fp16 d, then
 * (Q4_1) their fp16 m. Decoding into wide_block is then a mask and a shift per vector and
 * one conversion per scale vector; decoding GGUF's layout, eight transposes of 16-byte rows,
 * was most of a one-row product's time (docs/benchmarks.md, "Weights repacked at load"). */
#define PACKED_D (QK / 2 * WIDE_ROWS)      /* offset of the tile block's d's */
#define PACKED_M (PACKED_D + 2 * WIDE_ROWS) /* ... and of Q4_1's m's */
/* Q8_0 the same way, its bytes whole: dword r of vector g (of eight) is bytes 4g..4g+3 of
 * row r's values (group g), then the eight rows' fp16 d. The kernel then loads a group of
 * eight rows in one 32-byte load; from GGUF's rows it took four transposes per block, which
 * left one input row (the LM head of a decode step) on the four-row tiles, compute-bound at
 * 10-14 GB/s a thread on the 2-vCPU EPYC (docs/benchmarks.md). */
#define PACKED_Q8_D (QK * WIDE_ROWS)

/* `size` bytes between a tile's place and GGUF's, in the direction asked. */
static void move_bytes(uint8_t *packed, uint8_t *gguf, size_t size, int to_packed)
{
    if (to_packed) memcpy(packed, gguf, size);
    else memcpy(gguf, packed, size);
}

/* Block b of row r of a tile and the same block in GGUF's layout (`gguf`): moved into the
 * tile's block (`tile`) if to_packed, else out of it. */
static void move_block(uint8_t *tile, uint8_t *gguf, int r, int type, int to_packed)
{
    if (type == T_Q8_0) {
        move_bytes(tile + PACKED_Q8_D + 2 * r, gguf, 2, to_packed);
        for (int g = 0; g < QK / 4; g++)
            move_bytes(tile + 32 * g + 4 * r, gguf + 2 + 4 * g, 4, to_packed);
        return;
    }
    const int nibbles = type == T_Q4_0 ? 2 : 4; /* where a GGUF block's nibbles start */
    move_bytes(tile + PACKED_D + 2 * r, gguf, 2, to_packed);
    if (type == T_Q4_1) move_bytes(tile + PACKED_M + 2 * r, gguf + 2, 2, to_packed);
    for (int g = 0; g < QK / 8; g++)
        move_bytes(tile + 32 * g + 4 * r, gguf + nibbles + 4 * g, 4, to_packed);
}

/* Block b of row `row` of the packed n x k matrix w, in GGUF's layout, into `block`. */
static void packed_row_block(const uint8_t *w, int64_t k, int type, int64_t row, int64_t b,
                             uint8_t *block)
{
    const int64_t bytes = small_block_bytes(type), row_bytes = k / QK * bytes;
    uint8_t *tile = (uint8_t *)w + row / WIDE_ROWS * WIDE_ROWS * row_bytes + b * WIDE_ROWS * bytes;
    move_block(tile, block, (int)(row % WIDE_ROWS), type, 0);
}

/* The n x k Q4_0 / Q4_1 / Q8_0 matrix `from` (n a multiple of WIDE_ROWS) in the other layout:
 * into eight-row tiles if to_packed, else back into GGUF's rows. */
int fleet_gguf_repack(const uint8_t *from, int64_t n, int64_t k, int type, uint8_t *to,
                      int to_packed, int num_threads)
{
    if (type != T_Q4_0 && type != T_Q4_1 && type != T_Q8_0) return ERR_TYPE;
    if (k % QK || n % WIDE_ROWS) return ERR_SHAPE;
    const int64_t bytes = small_block_bytes(type), blocks = k / QK, row_bytes = blocks * bytes;
    uint8_t *const gguf = to_packed ? (uint8_t *)from : to;
    uint8_t *const packed = to_packed ? to : (uint8_t *)from;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (n >= 64)
    for (int64_t t = 0; t < n / WIDE_ROWS; t++)
        for (int64_t b = 0; b < blocks; b++) {
            uint8_t *tile = packed + t * WIDE_ROWS * row_bytes + b * WIDE_ROWS * bytes;
            for (int r = 0; r < WIDE_ROWS; r++)
                move_block(tile, gguf + (t * WIDE_ROWS + r) * row_bytes + b * bytes, r, type,
                           to_packed);
        }
    return OK;
}

#if defined(__AVX2__) && !defined(FLEET_NO_WIDE_TILES) /* the flag: for the tests' comparison */
#define HAS_WIDE_TILES 1
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define WIDE_VNNI 1 /* vpdpbusd: four products into an int32 lane in one instruction */
#else
#define WIDE_VNNI 0
#endif

typedef struct {
    uint8_t q[QK / 4][WIDE_ROWS * 4]; /* group g: four nibbles of each row, 0..15 */
    f32x8 dw;                         /* row r's d in lane r */
    f32x8 c;                          /* the offset: Q4_0's -8 * d, Q4_1's min */
} wide_block;

/* Four rows' dwords (a 4 x 4 block of 32-bit groups in each 128-bit lane) transposed, so that
 * v[g] holds group g of rows 0..3 (low lane) and 4..7 (high lane). */
static ALWAYS_INLINE void transpose_groups(__m256i v[4])
{
    const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    v[0] = _mm256_unpacklo_epi64(t0, t2);
    v[1] = _mm256_unpackhi_epi64(t0, t2);
    v[2] = _mm256_unpacklo_epi64(t1, t3);
    v[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* Block b of eight weight rows (rows[r]), decoded into the interleaved layout. */
static ALWAYS_INLINE void decode_wide_block(const uint8_t *const rows[WIDE_ROWS], int64_t b,
                                            int type, wide_block *out)
{
    const int64_t bytes = small_block_bytes(type), at = b * bytes;
    const __m256i mask = _mm256_set1_epi8(0xF);
    __m256i low[4], high[4]; /* elements 0..15 and 16..31: rows r and r + 4 */
    for (int r = 0; r < 4; r++) {
        const int64_t qs = at + (type == T_Q4_0 ? 2 : 4);
        const __m256i v = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(rows[r + 4] + qs)),
                                           _mm_loadu_si128((const __m128i *)(rows[r] + qs)));
        low[r] = _mm256_and_si256(v, mask);
        high[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
    transpose_groups(low);
    transpose_groups(high);
    for (int g = 0; g < 4; g++) {
        _mm256_store_si256((__m256i *)out->q[g], low[g]);
        _mm256_store_si256((__m256i *)out->q[g + 4], high[g]);
    }
    f32x8 mins = splat8(0.0f);
#if defined(__F16C__) /* each row's first four bytes (d, then Q4_1's m) in two conversions */
    int32_t heads[WIDE_ROWS];
    for (int r = 0; r < WIDE_ROWS; r++) memcpy(&heads[r], rows[r] + at, sizeof heads[r]);
    const __m256 h0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)heads));
    const __m256 h1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(heads + 4)));
    /* lanes d0 d1 d4 d5 | d2 d3 d6 d7 (and the m's), then pairs 0 2 1 3 into row order */
    out->dw = (f32x8)_mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(h0, h1, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
    if (type == T_Q4_1)
        mins = (f32x8)_mm256_castpd_ps(_mm256_permute4x64_pd(
            _mm256_castps_pd(_mm256_shuffle_ps(h0, h1, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
#else
    for (int r = 0; r < WIDE_ROWS; r++) {
        out->dw[r] = fp16_to_fp32(rows[r] + at);
        if (type == T_Q4_1) mins[r] = fp16_to_fp32(rows[r] + at + 2);
    }
#endif
    out->c = type == T_Q4_0 ? out->dw * splat8(-8.0f) : mins;
}

/* A packed block's eight fp16 scales (one per row) at p, as fp32. */
static ALWAYS_INLINE f32x8 packed_scales(const uint8_t *p)
{
#if defined(__F16C__)
    return (f32x8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    f32x8 out;
    for (int r = 0; r < WIDE_ROWS; r++) out[r] = fp16_to_fp32(p + 2 * r);
    return out;
#endif
}

/* Block b of a tile repacked at load (fleet_gguf_repack): the same layout from one 32-byte
 * load per two groups, a mask and a shift, without decode_wide_block's transposes. */
static ALWAYS_INLINE void decode_packed_block(const uint8_t *tile, int64_t b, int type,
                                              wide_block *out)
{
    const uint8_t *p = tile + b * WIDE_ROWS * small_block_bytes(type);
    const __m256i mask = _mm256_set1_epi8(0xF);
    for (int g = 0; g < 4; g++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * g));
        _mm256_store_si256((__m256i *)out->q[g], _mm256_and_si256(v, mask));
        _mm256_store_si256((__m256i *)out->q[g + 4],
                           _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
    }
    out->dw = packed_scales(p + PACKED_D);
    out->c = type == T_Q4_0 ? out->dw * splat8(-8.0f) : packed_scales(p + PACKED_M);
}

/* A Q8_0 block of eight weight rows in the same layout: signed bytes, so vpmaddubsw takes
 * their magnitudes against the input bytes carrying their signs (both kept here), and a
 * pair of products (at most 2 * 128 * 127) widens to int32 at once; no offset. */
typedef struct {
    int8_t q[QK / 4][WIDE_ROWS * 4];
    uint8_t aq[QK / 4][WIDE_ROWS * 4]; /* |q| */
    f32x8 dw;
} wide_block_q8;

static ALWAYS_INLINE void decode_wide_block_q8(const uint8_t *const rows[WIDE_ROWS], int64_t b,
                                               wide_block_q8 *out)
{
    const int64_t at = b * small_block_bytes(T_Q8_0);
    __m256i low[4], high[4]; /* rows r and r + 4, whole: dwords 0..3, then 4..7 per lane */
    for (int r = 0; r < 4; r++) {
        low[r] = _mm256_loadu_si256((const __m256i *)(rows[r] + at + 2));
        high[r] = _mm256_loadu_si256((const __m256i *)(rows[r + 4] + at + 2));
    }
    transpose_groups(low); /* low[g]: group g of rows 0..3, then group g + 4 */
    transpose_groups(high);
    for (int g = 0; g < 4; g++) {
        const __m256i first = _mm256_permute2x128_si256(low[g], high[g], 0x20);
        const __m256i second = _mm256_permute2x128_si256(low[g], high[g], 0x31);
        _mm256_store_si256((__m256i *)out->q[g], first);
        _mm256_store_si256((__m256i *)out->q[g + 4], second);
        _mm256_store_si256((__m256i *)out->aq[g], _mm256_sign_epi8(first, first));
        _mm256_store_si256((__m256i *)out->aq[g + 4], _mm256_sign_epi8(second, second));
    }
    for (int r = 0; r < WIDE_ROWS; r++) out->dw[r] = fp16_to_fp32(rows[r] + at);
}

/* Block b of a packed Q8_0 tile: the groups as they lie, their magnitudes, the d's. */
static ALWAYS_INLINE void decode_packed_block_q8(const uint8_t *tile, int64_t b,
                                                 wide_block_q8 *out)
{
    const uint8_t *p = tile + b * WIDE_ROWS * small_block_bytes(T_Q8_0);
    for (int g = 0; g < QK / 4; g++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * g));
        _mm256_store_si256((__m256i *)out->q[g], v);
        _mm256_store_si256((__m256i *)out->aq[g], _mm256_sign_epi8(v, v));
    }
    out->dw = packed_scales(p + PACKED_Q8_D);
}

/* y[j][t * WIDE_ROWS + r] = <x_j, w_{t,r}> for nx input rows and nt tiles' decoded blocks
 * (block b of tile t at decoded[b * WIDE_TILES + t]; nt = WIDE_TILES), or the packed tiles at
 * tiles[t] (not NULL: `type` says Q4_0 or Q4_1), each block decoded as it comes. */
static ALWAYS_INLINE void wide_dot(const wide_block *decoded, const uint8_t *const *tiles,
                                   const uint8_t *ahead, int64_t slice, int type,
                                   const xblock *x, int nx, int nt, int64_t blocks,
                                   float y[][WIDE_TILE_ROWS])
{
    f32x8 a[WIDE_X_ROWS][WIDE_TILES];
    for (int j = 0; j < nx; j++)
        for (int t = 0; t < nt; t++) a[j][t] = splat8(0.0f);
    for (int64_t b = 0; b < blocks; b++) {
        wide_block here[WIDE_TILES]; /* packed tiles read in place: one pass, nothing to keep */
        if (tiles) {
            prefetch_slice(ahead, slice, b);
            for (int t = 0; t < nt; t++) decode_packed_block(tiles[t], b, type, &here[t]);
        }
        const wide_block *w = tiles ? here : decoded + b * WIDE_TILES;
        __m256i sums[WIDE_X_ROWS][WIDE_TILES]; /* int32 with VNNI, else int16 pairs */
        for (int j = 0; j < nx; j++)
            for (int t = 0; t < nt; t++) sums[j][t] = _mm256_setzero_si256();
        for (int g = 0; g < QK / 4; g++) {
            __m256i wq[WIDE_TILES];
            for (int t = 0; t < nt; t++)
                wq[t] = _mm256_load_si256((const __m256i *)w[t].q[g]);
            for (int j = 0; j < nx; j++) {
                int32_t group;
                memcpy(&group, x[j * blocks + b].q + 4 * g, sizeof group);
                const __m256i xg = _mm256_set1_epi32(group);
                for (int t = 0; t < nt; t++) {
                    __m256i sum = sums[j][t];
#if WIDE_VNNI && defined(__AVX512VNNI__) && defined(__AVX512VL__)
                    sum = _mm256_dpbusd_epi32(sum, wq[t], xg);
#elif WIDE_VNNI
                    sum = _mm256_dpbusd_avx_epi32(sum, wq[t], xg);
#else
                    sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(wq[t], xg));
#endif
                    /* group after group: unordered, GCC computes every group's products
                     * first and spills them (7% slower prefills) */
                    __asm__("" : "+v"(sum));
                    sums[j][t] = sum;
                }
            }
        }
        for (int j = 0; j < nx; j++)
            for (int t = 0; t < nt; t++) {
#if WIDE_VNNI
                const f32x8 dots = (f32x8)_mm256_cvtepi32_ps(sums[j][t]);
#else
                const f32x8 dots = (f32x8)_mm256_cvtepi32_ps(
                    _mm256_madd_epi16(sums[j][t], _mm256_set1_epi16(1)));
#endif
                const xblock *xb = &x[j * blocks + b];
                a[j][t] = fma8(dots, w[t].dw * splat8(xb->d), a[j][t]);
                a[j][t] = fma8(w[t].c, splat8(xb->s), a[j][t]);
            }
    }
    for (int j = 0; j < nx; j++)
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < WIDE_ROWS; r++) y[j][t * WIDE_ROWS + r] = a[j][t][r];
}

/* wide_dot for Q8_0 blocks: the same sums as dot_tile_q8's for Q8_0, in its order. (One
 * function for both, the type a constant, measured 1-4% slower in kernel_ab.py.) With
 * `tiles` (packed Q8_0) each block is read in place, as wide_dot does. */
static ALWAYS_INLINE void wide_dot_q8(const wide_block_q8 *decoded, const uint8_t *const *tiles,
                                      const uint8_t *ahead, int64_t slice, const xblock *x,
                                      int nx, int nt, int64_t blocks,
                                      float y[][WIDE_TILE_ROWS])
{
    const int64_t block_bytes = WIDE_ROWS * small_block_bytes(T_Q8_0);
    f32x8 a[WIDE_Q8_X_ROWS][WIDE_TILES];
    for (int j = 0; j < nx; j++)
        for (int t = 0; t < nt; t++) a[j][t] = splat8(0.0f);
    for (int64_t b = 0; b < blocks; b++) {
        const wide_block_q8 *w = tiles ? NULL : decoded + b * WIDE_TILES;
        if (tiles) prefetch_slice(ahead, slice, b);
        __m256i sums[WIDE_Q8_X_ROWS][WIDE_TILES]; /* int32 */
        for (int j = 0; j < nx; j++)
            for (int t = 0; t < nt; t++) sums[j][t] = _mm256_setzero_si256();
        for (int g = 0; g < QK / 4; g++) {
            __m256i values[WIDE_TILES], magnitudes[WIDE_TILES];
            for (int t = 0; t < nt; t++) {
                if (tiles) {
                    values[t] = _mm256_loadu_si256(
                        (const __m256i *)(tiles[t] + b * block_bytes + 32 * g));
                    magnitudes[t] = _mm256_sign_epi8(values[t], values[t]);
                } else {
                    values[t] = _mm256_load_si256((const __m256i *)w[t].q[g]);
                    magnitudes[t] = _mm256_load_si256((const __m256i *)w[t].aq[g]);
                }
            }
            for (int j = 0; j < nx; j++) {
                int32_t group;
                memcpy(&group, x[j * blocks + b].q + 4 * g, sizeof group);
                const __m256i xg = _mm256_set1_epi32(group);
                for (int t = 0; t < nt; t++) {
                    const __m256i signed_x = _mm256_sign_epi8(xg, values[t]);
                    __m256i sum = sums[j][t];
#if WIDE_VNNI && defined(__AVX512VNNI__) && defined(__AVX512VL__)
                    sum = _mm256_dpbusd_epi32(sum, magnitudes[t], signed_x);
#elif WIDE_VNNI
                    sum = _mm256_dpbusd_avx_epi32(sum, magnitudes[t], signed_x);
#else
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(
                        _mm256_maddubs_epi16(magnitudes[t], signed_x), _mm256_set1_epi16(1)));
#endif
                    __asm__("" : "+v"(sum)); /* group after group, as in wide_dot */
                    sums[j][t] = sum;
                }
            }
        }
        for (int t = 0; t < nt; t++) {
            const f32x8 dw = tiles ? packed_scales(tiles[t] + b * block_bytes + PACKED_Q8_D)
                                   : w[t].dw;
            for (int j = 0; j < nx; j++)
                a[j][t] = fma8((f32x8)_mm256_cvtepi32_ps(sums[j][t]),
                               dw * splat8(x[j * blocks + b].d), a[j][t]);
        }
    }
    for (int j = 0; j < nx; j++)
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < WIDE_ROWS; r++) y[j][t * WIDE_ROWS + r] = a[j][t][r];
}

/* One pass of nx input rows (at most the type's rows per pass) over a task's nt tiles, with
 * nx and nt constants in each call: nt is 1 only for one input row over packed tiles. */
static ALWAYS_INLINE void wide_pass(const void *decoded, const uint8_t *const *tiles,
                                    const uint8_t *ahead, int64_t slice, const xblock *x,
                                    int nx, int64_t blocks, int type, int nt,
                                    float y[][WIDE_TILE_ROWS])
{
    if (type == T_Q8_0) {
        if (nt == 1) wide_dot_q8(decoded, tiles, ahead, slice, x, 1, 1, blocks, y);
        else if (nx == WIDE_Q8_X_ROWS)
            wide_dot_q8(decoded, tiles, ahead, slice, x, WIDE_Q8_X_ROWS, WIDE_TILES, blocks, y);
#if WIDE_Q8_X_ROWS > 2
        else if (nx == 2) wide_dot_q8(decoded, tiles, ahead, slice, x, 2, WIDE_TILES, blocks, y);
#endif
        else wide_dot_q8(decoded, tiles, ahead, slice, x, 1, WIDE_TILES, blocks, y);
        return;
    }
    if (nt == 1) wide_dot(decoded, tiles, ahead, slice, type, x, 1, 1, blocks, y);
    else if (nx == WIDE_X_ROWS)
        wide_dot(decoded, tiles, ahead, slice, type, x, WIDE_X_ROWS, WIDE_TILES, blocks, y);
#if WIDE_X_ROWS > 3
    else if (nx == 3) wide_dot(decoded, tiles, ahead, slice, type, x, 3, WIDE_TILES, blocks, y);
#endif
#if WIDE_X_ROWS > 2
    else if (nx == 2) wide_dot(decoded, tiles, ahead, slice, type, x, 2, WIDE_TILES, blocks, y);
#endif
    else wide_dot(decoded, tiles, ahead, slice, type, x, 1, WIDE_TILES, blocks, y);
}

/* Weight rows per task of the wide tiles: one tile for one input row over a packed matrix
 * (read in place: each thread then streams one run of bytes, where two tiles a pass read two
 * runs 2.9 KB apart; a one-sequence decode step took 6.12 against 6.43 ms and 6.39 against
 * 6.63, docs/benchmarks.md), else WIDE_TILES tiles, whose decoded blocks a pass of several
 * rows reuses. */
static ALWAYS_INLINE int64_t wide_task_rows(int64_t m, int packed_type)
{
    return (packed_type & PACKED) && m == 1 ? WIDE_ROWS : WIDE_TILE_ROWS;
}

/* Tasks [begin, end) of fleet_gguf_matmul_q8 through the wide tiles. */
static ALWAYS_INLINE int wide_tiles_q8(const xblock *x, int64_t m, int64_t k,
                                       const uint8_t *w, int64_t n, int packed_type, float *y,
                                       int64_t begin, int64_t end)
{
    const int type = packed_type & ~PACKED, packed = packed_type & PACKED;
    const int64_t blocks = k / QK, row_bytes = blocks * small_block_bytes(type);
    const size_t block_size = type == T_Q8_0 ? sizeof(wide_block_q8) : sizeof(wide_block);
    const size_t size = ((size_t)blocks * WIDE_TILES * block_size + 63) / 64 * 64;
    const int in_place = packed && m >= 1
                         && m <= (type == T_Q8_0 ? WIDE_Q8_X_ROWS : WIDE_IN_PLACE_ROWS);
    const int64_t task_rows = wide_task_rows(m, packed_type);
    const int nt = (int)(task_rows / WIDE_ROWS); /* tiles a task */
    char *decoded = in_place ? NULL : aligned_alloc(64, size);
    if (!in_place && !decoded) return ERR_NO_MEMORY;
    for (int64_t tile = begin; tile < end; tile++) {
        const int64_t n0 = tile * task_rows;
        const int64_t rows_here = n - n0 < task_rows ? n - n0 : task_rows;
        /* The next pass's rows are one run of bytes: ask for it a slice per block decoded
         * here, so that it arrives while this pass computes. Decoding GGUF's rows reads 16
         * rows at a stride the prefetchers do not follow: without this a decode step of
         * one sequence took 8.8-9.7 ms instead of 6.5-7.3 (docs/benchmarks.md). */
        const uint8_t *next = w + (n0 + task_rows) * row_bytes;
        const int64_t slice = (task_rows * row_bytes + nt * blocks - 1) / (nt * blocks);
        const uint8_t *tiles[WIDE_TILES]; /* packed: a short last task repeats its first */
        for (int t = 0; t < nt && packed; t++)
            tiles[t] = w + (n0 + (t * WIDE_ROWS < rows_here ? t * WIDE_ROWS : 0)) * row_bytes;
        if (in_place) { /* one pass, asking for the next task's bytes a slice per block */
            float out[WIDE_IN_PLACE_ROWS > WIDE_Q8_X_ROWS ? WIDE_IN_PLACE_ROWS
                                                           : WIDE_Q8_X_ROWS][WIDE_TILE_ROWS];
            wide_pass(NULL, tiles, next, nt * slice, x, (int)m, blocks, type, nt, out);
            for (int j = 0; j < m; j++)
                store_tile(y + j * n + n0, out[j], rows_here, task_rows);
            continue;
        }
        for (int t = 0; t < WIDE_TILES && packed; t++)
            for (int64_t b = 0; b < blocks; b++) {
                prefetch_slice(next, slice, t * blocks + b);
                void *out = decoded + (b * WIDE_TILES + t) * block_size;
                if (type == T_Q8_0) decode_packed_block_q8(tiles[t], b, out);
                else decode_packed_block(tiles[t], b, type, out);
            }
        for (int t = 0; t < WIDE_TILES && !packed; t++) {
            const uint8_t *rows[WIDE_ROWS];
            for (int r = 0; r < WIDE_ROWS; r++) { /* a ragged tile repeats its last row */
                const int64_t row = t * WIDE_ROWS + r;
                rows[r] = w + (n0 + (row < rows_here ? row : rows_here - 1)) * row_bytes;
            }
            for (int64_t b = 0; b < blocks; b++) {
                prefetch_slice(next, slice, t * blocks + b);
                void *out = decoded + (b * WIDE_TILES + t) * block_size;
                if (type == T_Q8_0) decode_wide_block_q8(rows, b, out);
                else decode_wide_block(rows, b, type, out);
            }
        }
        const int pass = type == T_Q8_0 ? WIDE_Q8_X_ROWS : WIDE_X_ROWS;
        float out[WIDE_X_ROWS > WIDE_Q8_X_ROWS ? WIDE_X_ROWS : WIDE_Q8_X_ROWS][WIDE_TILE_ROWS];
        for (int64_t i = 0; i < m; i += pass) {
            const int nx = (int)(m - i < pass ? m - i : pass);
            wide_pass(decoded, NULL, NULL, 0, x + i * blocks, nx, blocks, type, WIDE_TILES, out);
            for (int j = 0; j < nx; j++)
                store_tile(y + (i + j) * n + n0, out[j], rows_here, WIDE_TILE_ROWS);
        }
    }
    free(decoded);
    return OK;
}
#else
#define HAS_WIDE_TILES 0
#endif

#define SMALL_INPUT_BLOCKS 256 /* 10 KiB: one input row of up to 8,192 values */

/* xq: m * k / QK blocks: x (m x k, fp32) quantized per block as the kernel below does it
 * (d, s = d * sum(q), then the 32 q; 40 bytes a block). For tests. */
int fleet_gguf_quantize_input(const float *x, int64_t m, int64_t k, void *xq)
{
    if (k % QK) return ERR_SHAPE;
    for (int64_t i = 0; i < m; i++) quantize_row_blocks(x + i * k, k, (xblock *)xq + i * (k / QK));
    return OK;
}

/* Whether the product of m rows by a matrix of `type` takes the wide tiles (tasks of
 * wide_task_rows weight rows) rather than the four-row tiles. */
static inline int takes_wide_tiles(int64_t m, int type)
{
    return HAS_WIDE_TILES && (type != T_Q8_0 || m >= WIDE_Q8_MIN_ROWS);
}

/* Tasks [begin, end) (q8_num_tiles of them) of the product of the quantized rows xq (m of
 * them) by w, into y: the wide or the four-row tiles, each type with its own unrolled loop.
 * 0 or ERR_NO_MEMORY. */
static int q8_tiles(const xblock *xq, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                    int type, float *y, int64_t begin, int64_t end)
{
#if HAS_WIDE_TILES
    if (takes_wide_tiles(m, type)) {
        switch (type) {
        case T_Q4_0: return wide_tiles_q8(xq, m, k, w, n, T_Q4_0, y, begin, end);
        case T_Q4_1: return wide_tiles_q8(xq, m, k, w, n, T_Q4_1, y, begin, end);
        case T_Q4_0 | PACKED: return wide_tiles_q8(xq, m, k, w, n, T_Q4_0 | PACKED, y, begin, end);
        case T_Q4_1 | PACKED: return wide_tiles_q8(xq, m, k, w, n, T_Q4_1 | PACKED, y, begin, end);
        case T_Q8_0 | PACKED: return wide_tiles_q8(xq, m, k, w, n, T_Q8_0 | PACKED, y, begin, end);
        default: return wide_tiles_q8(xq, m, k, w, n, T_Q8_0, y, begin, end);
        }
    }
#endif
    switch (type) {
    case T_Q4_0: return direct_tiles_q8(xq, m, k, w, n, T_Q4_0, y, begin, end);
    case T_Q4_1: return direct_tiles_q8(xq, m, k, w, n, T_Q4_1, y, begin, end);
    default: return direct_tiles_q8(xq, m, k, w, n, T_Q8_0, y, begin, end);
    }
}

static int64_t q8_num_tiles(int64_t m, int64_t n, int type)
{
    int64_t rows = ROWS;
#if HAS_WIDE_TILES
    if (takes_wide_tiles(m, type)) rows = wide_task_rows(m, type);
#endif
    return (n + rows - 1) / rows;
}

static int check_q8(int64_t k, int64_t n, int type)
{
    const int base = type & ~PACKED, packed = type & PACKED; /* packed: wide tiles only */
    if ((base != T_Q4_0 && base != T_Q4_1 && base != T_Q8_0) || (packed && !HAS_WIDE_TILES))
        return ERR_TYPE;
    if (k % QK || (packed && n % WIDE_ROWS)) return ERR_SHAPE;
    return OK;
}

/* x's m rows quantized per block, into `small` (SMALL_INPUT_BLOCKS) where they fit: a decode
 * step's few rows need no allocation per product. Else an allocation for the caller to free;
 * NULL where there is no memory. */
static xblock *quantized_rows(const float *x, int64_t m, int64_t k, xblock *small,
                              int num_threads)
{
    const int64_t count = m * (k / QK);
    xblock *xq = count <= SMALL_INPUT_BLOCKS ? small : malloc((size_t)count * sizeof(xblock));
    if (xq != NULL)
        PARALLEL_FOR(m >= 8 ? num_threads : 1, i, m,
            quantize_row_blocks(x + i * k, k, xq + i * (k / QK));
        );
    return xq;
}

/* y (m x n, fp32) = x (m x k, fp32), quantized per 32-element block to int8, times the
 * transpose of w (n x k, Q4_0 / Q4_1 / Q8_0) by integer dot products. */
int fleet_gguf_matmul_q8(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int type, float *y, int num_threads)
{
    int status = check_q8(k, n, type);
    if (status) return status;
    xblock small[SMALL_INPUT_BLOCKS];
    xblock *xq = quantized_rows(x, m, k, small, num_threads);
    if (xq == NULL) return ERR_NO_MEMORY;
    const int64_t num_tiles = q8_num_tiles(m, n, type);
    if (num_threads <= 1 || num_tiles <= 1) {
        status = q8_tiles(xq, m, k, w, n, type, y, 0, num_tiles);
    } else {
#pragma omp parallel num_threads(num_threads)
        {
            const Team t = {omp_get_thread_num(), omp_get_num_threads(), NULL};
            int64_t begin, end;
            team_share(&t, num_tiles, &begin, &end);
            const int failed = q8_tiles(xq, m, k, w, n, type, y, begin, end);
            if (failed) {
#pragma omp atomic write
                status = failed;
            }
        }
    }
    if (xq != small) free(xq);
    return status;
}

/* fleet_gguf_matmul_q8 by a team: this thread's share of the tiles, without a region of its
 * own (team.h); the caller syncs the team before y is read. Each thread quantizes the rows
 * itself (a decode step's few). */
int fleet_gguf_matmul_q8_team(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                              int type, float *y, const Team *t)
{
    int status = check_q8(k, n, type);
    if (status) return status;
    xblock small[SMALL_INPUT_BLOCKS];
    xblock *xq = quantized_rows(x, m, k, small, 1);
    if (xq == NULL) return ERR_NO_MEMORY;
    int64_t begin, end;
    team_share(t, q8_num_tiles(m, n, type), &begin, &end);
    status = q8_tiles(xq, m, k, w, n, type, y, begin, end);
    if (xq != small) free(xq);
    return status;
}

/* 1 where Q4_0 / Q4_1 / Q8_0 products take the integer kernels' tiles at any number of input
 * rows (AVX2 builds: the wide tiles, Q8_0's from two rows): then they never need the
 * dequantized weight's GEMM. */
int fleet_gguf_wide_tiles(void) { return HAS_WIDE_TILES; }

/* Bit t set for each type code t that fleet_gguf_repack packs, and that the products and
 * fleet_gguf_dequantize_rows then take packed (with PACKED added to the code). */
int fleet_gguf_packed_types(void) { return 1 << T_Q4_0 | 1 << T_Q4_1 | 1 << T_Q8_0; }
