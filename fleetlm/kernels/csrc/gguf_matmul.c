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
 * Dequantization follows ggml (llama.cpp) and gguf-py operation by operation in fp32, so the
 * weights multiplied are exactly dequantize(W); only the order of the sums differs from a
 * float matmul. (Every product of a scale and a quantized value below is exact in fp32: an
 * fp16 scale has 11 significant bits, times at most 8 bits of a quantized value or 6 of a
 * sub-block scale, so whether the compiler fuses the following add changes nothing.)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector.h"

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14 };
enum { OK = 0, ERR_TYPE = 1, ERR_SHAPE = 2, ERR_NO_MEMORY = 3 };

#define ROWS 4 /* weight rows per task */
#define PREFETCH_TILES 2 /* the direct path asks for the tile this many tiles ahead */
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
        for (int64_t p = b * ahead; p < (b + 1) * ahead; p += 64)
            __builtin_prefetch(w + PREFETCH_TILES * rows * row_bytes + p);
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
