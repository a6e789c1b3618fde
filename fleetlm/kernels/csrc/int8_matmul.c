/* W8A8 linear layers for CPUs: y = (x_q W_q^T) * x_scale * w_scale + bias, with W_q int8 and
 * one fp32 scale per output row (compressed-tensors' channel-wise symmetric weights), and x
 * quantized here, per row (per token), to int8 with its own scale: dynamic symmetric int8
 * activations. Products are summed exactly in int32; only the rescale is floating point.
 *
 * Plain C + OpenMP, compiled at first use by fleetlm/kernels/cpu_build.py (-march=native picks
 * the path below) and called through ctypes by fleetlm/kernels/int8_linear.py:
 *   - AVX512-VNNI (with VL) or AVX-VNNI: vpdpbusd sums four u8 x s8 products into each int32;
 *   - AVX2: vpmaddubsw (pairs of u8 x s8 into int16) then vpmaddwd by ones (into int32);
 *   - anything else: plain loops.
 * Both vector paths take unsigned times signed bytes, so they multiply |w| by x carrying w's
 * sign ("the sign trick"). |w| fits a u8 even for -128 (which compressed-tensors checkpoints
 * may hold); x is quantized to [-127, 127], so flipping its sign never overflows, and a pair
 * of products stays within int16 (2 * 128 * 127 = 32512): nothing saturates, the int32 sums
 * are exact.
 *
 * A task is a tile of ROWS weight rows; every input row is multiplied with it, IN_ROWS input
 * rows at a time (IN_ROWS x ROWS accumulators), so the weight is read once per call whatever
 * the number of input rows: that, not the arithmetic, bounds a decode step.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vector.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { OK = 0, ERR_NO_MEMORY = 3 };

#ifndef ROWS
#define ROWS 4    /* weight rows per task */
#endif
#ifndef IN_ROWS
#define IN_ROWS 2 /* input rows per pass over a tile */
#endif
#define QMAX 127  /* activations are quantized to [-QMAX, QMAX] */

/* ---- dynamic per-row activation quantization ------------------------------------------ */

/* scale = max|x| / 127 and q = round-half-even(x / scale) clamped to [-127, 127], the same
 * fp32 operations as the torch reference (int8_linear.quantize_rows_reference), so both give
 * the same bytes. A row of zeros has scale 0 and q 0. */
static void quantize_row(const float *x, int64_t k, int8_t *q, float *scale_out)
{
    float amax = 0.0f;
    for (int64_t c = 0; c < k; c++) amax = fmaxf(amax, fabsf(x[c]));
    const float scale = amax / (float)QMAX;
    *scale_out = scale;
    const float divisor = scale > 0.0f ? scale : 1.0f;
    int64_t c = 0;
#if defined(__AVX2__)
    const __m256 d = _mm256_set1_ps(divisor), lo = _mm256_set1_ps(-QMAX), hi = _mm256_set1_ps(QMAX);
    for (; c + 8 <= k; c += 8) {
        __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + c), d);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        const __m256i i32 = _mm256_cvtps_epi32(v);
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32),
                                            _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64((__m128i *)(q + c), _mm_packs_epi16(i16, i16));
    }
#endif
    for (; c < k; c++) q[c] = (int8_t)fminf(fmaxf(nearbyintf(x[c] / divisor), -QMAX), QMAX);
}

int fleet_int8_quantize_rows(const float *x, int64_t m, int64_t k, int8_t *q, float *scales,
                             int num_threads)
{
    PARALLEL_FOR(m > 1 ? num_threads : 1, r, m,
        quantize_row(x + r * k, k, q + r * k, scales + r);
    );
    return OK;
}

/* ---- int8 x int8 -> int32 dot products --------------------------------------------------- */

#if defined(__AVX2__)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT_PATH "avx512vnni"
static inline __m256i dot_add(__m256i acc, __m256i w_abs, __m256i x_signed)
{
    return _mm256_dpbusd_epi32(acc, w_abs, x_signed);
}
#elif defined(__AVXVNNI__)
#define DOT_PATH "avxvnni"
static inline __m256i dot_add(__m256i acc, __m256i w_abs, __m256i x_signed)
{
    return _mm256_dpbusd_avx_epi32(acc, w_abs, x_signed);
}
#else
#define DOT_PATH "avx2"
static inline __m256i dot_add(__m256i acc, __m256i w_abs, __m256i x_signed)
{
    const __m256i pairs = _mm256_maddubs_epi16(w_abs, x_signed);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

static inline int32_t hsum_i32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* sums[i][j] = x[i] . w[j] for nx input rows and nw weight rows (nx <= IN_ROWS, nw <= ROWS);
 * the compiler specialises it for the constant counts it is called with. */
static inline __attribute__((always_inline)) void dot_tile(
    const int8_t *x, int64_t nx, const int8_t *w, int64_t nw, int64_t k,
    int32_t sums[IN_ROWS][ROWS])
{
    __m256i acc[IN_ROWS][ROWS];
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) acc[i][j] = _mm256_setzero_si256();
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
        __m256i wv[ROWS], wa[ROWS];
        for (int j = 0; j < nw; j++) {
            wv[j] = _mm256_loadu_si256((const __m256i *)(w + j * k + c));
            wa[j] = _mm256_abs_epi8(wv[j]);
        }
        for (int i = 0; i < nx; i++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + i * k + c));
            for (int j = 0; j < nw; j++)
                acc[i][j] = dot_add(acc[i][j], wa[j], _mm256_sign_epi8(xv, wv[j]));
        }
    }
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) {
            int32_t s = hsum_i32(acc[i][j]);
            for (int64_t t = c; t < k; t++) s += (int32_t)x[i * k + t] * (int32_t)w[j * k + t];
            sums[i][j] = s;
        }
}
#else
#define DOT_PATH "generic"
static inline void dot_tile(const int8_t *x, int64_t nx, const int8_t *w, int64_t nw,
                            int64_t k, int32_t sums[IN_ROWS][ROWS])
{
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) {
            int32_t s = 0;
            for (int64_t c = 0; c < k; c++) s += (int32_t)x[i * k + c] * (int32_t)w[j * k + c];
            sums[i][j] = s;
        }
}
#endif

/* Which of the paths above this build runs (tests and benchmarks name it). */
const char *fleet_int8_path(void) { return DOT_PATH; }

/* One tile of weight rows [j0, j0 + nw) against every input row. The rescale is written as the
 * reference computes it, ((float)sum * x_scale) * w_scale, then + bias. */
static void gemm_tile(const int8_t *q, const float *xs, int64_t m, int64_t k, const int8_t *w,
                      const float *ws, const float *bias, int64_t n, float *y, int64_t j0)
{
    const int64_t nw = n - j0 < ROWS ? n - j0 : ROWS;
    int32_t sums[IN_ROWS][ROWS];
    for (int64_t i0 = 0; i0 < m; i0 += IN_ROWS) {
        const int64_t nx = m - i0 < IN_ROWS ? m - i0 : IN_ROWS;
        if (nx == IN_ROWS && nw == ROWS)
            dot_tile(q + i0 * k, IN_ROWS, w + j0 * k, ROWS, k, sums);
        else if (nw == ROWS)
            dot_tile(q + i0 * k, 1, w + j0 * k, ROWS, k, sums);
        else
            dot_tile(q + i0 * k, nx, w + j0 * k, nw, k, sums);
        for (int64_t i = 0; i < nx; i++)
            for (int64_t j = 0; j < nw; j++) {
                float v = (float)sums[i][j] * xs[i0 + i];
                v = v * ws[j0 + j];
                if (bias) v = v + bias[j0 + j];
                y[(i0 + i) * n + j0 + j] = v;
            }
    }
}

/* y (m, n) = (q (m, k) . w (n, k)^T) * xs[:, None] * ws[None, :] + bias (bias may be NULL). */
int fleet_int8_gemm(const int8_t *q, const float *xs, int64_t m, int64_t k, const int8_t *w,
                    const float *ws, const float *bias, int64_t n, float *y, int num_threads)
{
    const int64_t tiles = (n + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) gemm_tile(q, xs, m, k, w, ws, bias, n, y, t * ROWS);
    return OK;
}

/* The whole W8A8 linear layer in one call: quantize x (m, k) per row, then fleet_int8_gemm. */
int fleet_w8a8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const float *ws,
                      const float *bias, int64_t n, float *y, int num_threads)
{
    int8_t *q = malloc((size_t)(m * k) + (size_t)m * sizeof(float) + 64);
    if (!q) return ERR_NO_MEMORY;
    float *xs = (float *)(q + ((m * k + 63) / 64) * 64);
    fleet_int8_quantize_rows(x, m, k, q, xs, num_threads);
    fleet_int8_gemm(q, xs, m, k, w, ws, bias, n, y, num_threads);
    free(q);
    return OK;
}
