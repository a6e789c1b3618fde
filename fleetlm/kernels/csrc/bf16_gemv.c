/* y = x W^T for a decode step's input rows (fleetlm sends one), bf16 x and W (W in its plain
 * [n, k] layout, the model's own parameter), sums in fp32, y rounded to bf16 to nearest even.
 *
 * At one row a linear layer only has to stream its weight once; oneDNN's packed GEMM reaches
 * about 30 GB/s on the built-in model's layers there, against the ~42 GB/s this VM streams
 * (docs/benchmarks.md). Here each thread walks its own blocks of VLEN W rows side by
 * side, and the VLEN outputs' partial sums are folded into one vector at the end (no
 * horizontal sum per output). Row m's sums run in the same order whatever the other rows are,
 * so its result does not depend on the batch.
 *
 * Where the CPU has AVX512-BF16, `vdpbf16ps` multiplies 32 bf16 pairs per instruction; else
 * the bf16 values are widened to fp32 and multiplied with FMAs (the same products, summed in
 * another order). Compiled at first use by fleetlm/kernels/cpu_build.py, called through ctypes
 * by fleetlm/kernels/bf16_gemv.py (the contract and the torch reference).
 */
#include <stdint.h>
#include <string.h>

#include "vector.h"

#define MIN_OUTS_PER_THREAD 64

enum { OK = 0, ERR_SHAPE = 1 };

#if defined(__AVX512BF16__) && VLEN == 16
/* 32 bf16 values as they are; vdpbf16ps multiplies pairs of them into 16 fp32 sums. */
#define STEP 32
typedef __m512i operand;
static ALWAYS_INLINE operand load_operand(const uint16_t *p)
{
    operand v;
    memcpy(&v, p, sizeof v);
    return v;
}
static ALWAYS_INLINE fvec dot(fvec acc, operand a, operand b)
{
    return (fvec)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
}
#else
/* VLEN bf16 values widened to fp32. */
#define STEP VLEN
typedef fvec operand;
static ALWAYS_INLINE operand load_operand(const uint16_t *p) { return loadv_bf16(p); }
static ALWAYS_INLINE fvec dot(fvec acc, operand a, operand b) { return acc + a * b; }
#endif

/* y[n0, n0 + VLEN) of one input row: VLEN weight rows side by side, their sums folded into
 * one vector (vector.h), whose lane i is output n0 + i. */
static ALWAYS_INLINE void out_tile(const uint16_t *x, const uint16_t *w, uint16_t *y,
                                   int64_t n0, int64_t k)
{
    fvec acc[VLEN] = {{0}};
    for (int64_t d = 0; d < k; d += STEP) {
        const operand xv = load_operand(x + d);
        _Pragma("GCC unroll 16")
        for (int j = 0; j < VLEN; j++)
            acc[j] = dot(acc[j], xv, load_operand(w + (n0 + FOLD_ORDER[j]) * k + d));
    }
    storev_bf16(y + n0, fold_sums(acc));
}

/* x [m, k], w [n, k], y [m, n], all bf16 and contiguous; k a multiple of 32, n of 16. Each
 * thread takes whole tiles of VLEN outputs, for every row (a tile's weight rows are read from
 * memory for the first row and from cache for the others). */
int fleet_bf16_gemv(const void *x, const void *w, void *y, int64_t m, int64_t n, int64_t k,
                    int num_threads)
{
    if (m < 1 || k % 32 || n % 16) return ERR_SHAPE;
    const uint16_t *xs = x, *ws = w;
    uint16_t *ys = y;
    const int64_t num_tiles = n / VLEN, useful = n / MIN_OUTS_PER_THREAD;
    const int threads = useful < 1 ? 1 : useful < num_threads ? (int)useful : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < num_tiles; t++)
        for (int64_t r = 0; r < m; r++) out_tile(xs + r * k, ws, ys + r * n, t * VLEN, k);
    return OK;
}
