/* How fast this machine streams the built-in model's Q4_1 layer matrices (qkv, o, gate_up,
 * down: 30 layers, 66 MB) with two threads: one parallel region per matrix, as the products
 * run (mode 0); one region over all of it (mode 1); and one region per matrix with a 5 us
 * serial gap after each (mode 2, like the step's norms and attention). Best of 20.
 * docs/benchmarks.md, "Weights repacked at load":
 *
 *     gcc -O2 -mavx2 -fopenmp stream_read.c -o /tmp/stream_read && /tmp/stream_read
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static __m256i touch(const char *p, size_t n)
{
    __m256i acc = _mm256_setzero_si256();
    for (size_t i = 0; i < n; i += 32)
        acc = _mm256_add_epi8(acc, _mm256_loadu_si256((const __m256i *)(p + i)));
    return acc;
}

/* Both threads read half of n bytes at p each. */
static void read_halves(const char *p, size_t n, volatile int *sink)
{
#pragma omp parallel num_threads(2)
    {
        const int t = omp_get_thread_num();
        *sink += _mm256_extract_epi32(touch(p + t * (n / 2), n / 2), 0);
    }
}

int main(void)
{
    const size_t sizes[4] = {345600, 207360, 1105920, 552960};
    size_t layer = 0;
    for (int i = 0; i < 4; i++) layer += sizes[i];
    const size_t total = layer * 30;
    char *buf = aligned_alloc(64, total);
    memset(buf, 1, total);
    volatile int sink = 0;
    for (int mode = 0; mode < 3; mode++) {
        double best = 1e9;
        for (int it = 0; it < 20; it++) {
            const double t0 = omp_get_wtime();
            if (mode == 1) {
                read_halves(buf, total, &sink);
            } else {
                const char *p = buf;
                for (int l = 0; l < 30; l++)
                    for (int i = 0; i < 4; i++) {
                        read_halves(p, sizes[i], &sink);
                        p += sizes[i];
                        const double gap = omp_get_wtime();
                        while (mode == 2 && omp_get_wtime() - gap < 5e-6) continue;
                    }
            }
            const double dt = omp_get_wtime() - t0;
            best = dt < best ? dt : best;
        }
        printf("mode %d: %.3f ms, %.1f GB/s\n", mode, best * 1e3, total / best / 1e9);
    }
    free(buf);
    return 0;
}
