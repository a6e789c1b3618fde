/* y = x W^T, bf16 x and W, sums in fp32, y rounded to bf16 to nearest even; CPUs with
 * AVX512-BF16 only.
 *
 * W is packed once (fleetlm/kernels/bf16_gemm.py, `pack`) into blocks of 16 outputs, each
 * block's k in pairs, and the blocks in groups of GROUP side by side:
 * wp[g][p][j][i][2] = (W[16 (GROUP g + j) + i][2p], W[...][2p + 1]), a last group of fewer
 * blocks packed the same way. One zmm load is then a k pair of 16 outputs, `vdpbf16ps` with a
 * row's (x[2p], x[2p + 1]) broadcast adds both products to the 16 outputs' sums (no
 * horizontal sum), and a group's weight is one stream read in order.
 *
 * A tile is MR rows by NR blocks of 16 outputs, MR x NR sums in registers (at most 24, plus NR
 * weight vectors and one broadcast: the 32 zmm registers). A group is the unit of work of a
 * thread; within it the rows go in chunks of up to 8, and each chunk walks the group's blocks
 * NR at a time (the group's weight, GROUP x 16 outputs x k, stays in L2 for the chunks after
 * the first, which prefetches it PREFETCH_PAIRS k pairs ahead). Each output's sum runs over k
 * in the same order whatever the other rows are, so a row's result does not depend on the
 * batch.
 *
 * Compiled at first use by fleetlm/kernels/cpu_build.py, called through ctypes by
 * fleetlm/kernels/bf16_gemm.py (the contract and the torch reference).
 */
#include <stdint.h>
#include <string.h>

#include "vector.h"

enum { OK = 0, ERR_SHAPE = 1, ERR_CPU = 2 };

#define GROUP 6           /* blocks of 16 outputs per unit of work; both tile widths divide it */
#define MAX_MR 8          /* rows per chunk */
#define PREFETCH_PAIRS 16 /* how far ahead (in k pairs) a tile asks for its weight */

int fleet_bf16_gemm_supported(void)
{
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512BF16__
/* Blocks of 16 outputs per tile at MR rows: MR x NR sums + NR weights + 1 broadcast <= 32. */
#define NR_OF(mr) ((mr) <= 4 ? 6 : 3)

static ALWAYS_INLINE __m512bh load_pair_block(const uint16_t *p)
{
    __m512i v;
    memcpy(&v, p, sizeof v);
    return (__m512bh)v;
}

static ALWAYS_INLINE __m512bh broadcast_pair(const uint16_t *p)
{
    int32_t pair;
    memcpy(&pair, p, sizeof pair);
    return (__m512bh)_mm512_set1_epi32(pair);
}

static ALWAYS_INLINE void store_block(uint16_t *p, __m512 v)
{
    fvec f;
    memcpy(&f, &v, sizeof f);
    storev_bf16(p, f);
}

/* y[r][16 j + i] for r < MR, j < NR: x rows at stride k, y at stride n, wp at the tile's first
 * block of pair 0, the group's pairs `pair_stride` uint16 apart. */
static ALWAYS_INLINE void tile(const uint16_t *x, const uint16_t *wp, uint16_t *y, int64_t n,
                               int64_t k, int64_t pair_stride, const int MR, const int NR)
{
    __m512 acc[MAX_MR][6];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MR; r++)
        _Pragma("GCC unroll 6")
        for (int j = 0; j < NR; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < k / 2; p++) {
        const uint16_t *w_p = wp + p * pair_stride;
        if (p + PREFETCH_PAIRS < k / 2) {
            _Pragma("GCC unroll 6")
            for (int j = 0; j < NR; j++)
                _mm_prefetch((const char *)(w_p + PREFETCH_PAIRS * pair_stride + 32 * j),
                             _MM_HINT_T0);
        }
        __m512bh w[6];
        _Pragma("GCC unroll 6")
        for (int j = 0; j < NR; j++) w[j] = load_pair_block(w_p + 32 * j);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < MR; r++) {
            const __m512bh xr = broadcast_pair(x + r * k + 2 * p);
            _Pragma("GCC unroll 6")
            for (int j = 0; j < NR; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xr, w[j]);
        }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MR; r++)
        _Pragma("GCC unroll 6")
        for (int j = 0; j < NR; j++) store_block(y + r * n + 16 * j, acc[r][j]);
}

typedef void (*tile_fn)(const uint16_t *, const uint16_t *, uint16_t *, int64_t, int64_t,
                        int64_t);

#define DEFINE_TILES(MR)                                                                     \
    static void tile_##MR##_full(const uint16_t *x, const uint16_t *wp, uint16_t *y,        \
                                 int64_t n, int64_t k, int64_t pair_stride)                 \
    {                                                                                       \
        tile(x, wp, y, n, k, pair_stride, MR, NR_OF(MR));                                   \
    }                                                                                       \
    static void tile_##MR##_one(const uint16_t *x, const uint16_t *wp, uint16_t *y,         \
                                int64_t n, int64_t k, int64_t pair_stride)                  \
    {                                                                                       \
        tile(x, wp, y, n, k, pair_stride, MR, 1);                                           \
    }
DEFINE_TILES(1)
DEFINE_TILES(2)
DEFINE_TILES(3)
DEFINE_TILES(4)
DEFINE_TILES(5)
DEFINE_TILES(6)
DEFINE_TILES(7)
DEFINE_TILES(8)

static const tile_fn FULL[MAX_MR + 1] = {0, tile_1_full, tile_2_full, tile_3_full, tile_4_full,
                                         tile_5_full, tile_6_full, tile_7_full, tile_8_full};
static const tile_fn ONE[MAX_MR + 1] = {0, tile_1_one, tile_2_one, tile_3_one, tile_4_one,
                                        tile_5_one, tile_6_one, tile_7_one, tile_8_one};

/* Group g (blocks [GROUP g, GROUP g + num_blocks)) of every row: chunks of rows, each over
 * the group's blocks NR at a time (a last part narrower than NR one block at a time). */
static void group(const uint16_t *x, const uint16_t *wp, uint16_t *y, int64_t m, int64_t n,
                  int64_t k, int64_t g, int64_t num_blocks)
{
    const uint16_t *wg = wp + g * GROUP * 16 * k; /* the groups before it are whole */
    const int64_t pair_stride = 32 * num_blocks;
    uint16_t *yg = y + 16 * GROUP * g;
    for (int64_t r0 = 0; r0 < m; r0 += MAX_MR) {
        const int mr = m - r0 < MAX_MR ? (int)(m - r0) : MAX_MR, nr = NR_OF(mr);
        int64_t b = 0;
        for (; b + nr <= num_blocks; b += nr)
            FULL[mr](x + r0 * k, wg + 32 * b, yg + r0 * n + 16 * b, n, k, pair_stride);
        for (; b < num_blocks; b++)
            ONE[mr](x + r0 * k, wg + 32 * b, yg + r0 * n + 16 * b, n, k, pair_stride);
    }
}
#endif

/* x [m, k] and y [m, n] bf16 and contiguous, wp W [n, k] packed as above; k even, n a multiple
 * of 16. ERR_CPU where the CPU (as compiled for) has no AVX512-BF16. */
int fleet_bf16_gemm(const void *x, const void *wp, void *y, int64_t m, int64_t n, int64_t k,
                    int num_threads)
{
#ifdef __AVX512BF16__
    if (m < 1 || k < 2 || k % 2 || n % 16) return ERR_SHAPE;
    const int64_t num_blocks = n / 16, num_groups = (num_blocks + GROUP - 1) / GROUP;
    const int threads = num_groups < num_threads ? (int)num_groups : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < num_groups; g++)
        group(x, wp, y, m, n, k, g, g + 1 < num_groups ? GROUP : num_blocks - GROUP * g);
    return OK;
#else
    (void)x, (void)wp, (void)y, (void)m, (void)n, (void)k, (void)num_threads;
    return ERR_CPU;
#endif
}
