#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
static float sum(const uint8_t *p, size_t bytes, int threads) {
    float total = 0;
#pragma omp parallel num_threads(threads) reduction(+:total)
    {
        __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
#pragma omp for schedule(static) nowait
        for (size_t i = 0; i < bytes; i += 64) {
            acc = _mm256_add_ps(acc, _mm256_load_ps((const float *)(p + i)));
            acc2 = _mm256_add_ps(acc2, _mm256_load_ps((const float *)(p + i + 32)));
        }
        acc = _mm256_add_ps(acc, acc2);
        float t[8]; _mm256_storeu_ps(t, acc); for (int j = 0; j < 8; j++) total += t[j];
    }
    return total;
}
int main(int argc, char **argv) {
    size_t total = 184320 * 360;
    uint8_t *p = mmap(NULL, total + (4u<<20), PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    uint8_t *w = (uint8_t *)(((uintptr_t)p + (2u<<20) - 1) & ~(uintptr_t)((2u<<20)-1));
    madvise(w, total, MADV_HUGEPAGE); memset(w, 0x3C, total);
    size_t fl = 128u << 20; volatile uint8_t *flush = malloc(fl); memset((void*)flush, 1, fl);
    int splits[] = {1, 8, 30, 120, 480}; const int ns = 5, reps = 41; double ts[5][41]; float sink = 0;
    for (int r = 0; r < reps; r++) for (int v = 0; v < ns; v++) {
        uint64_t s = 0; for (size_t i = 0; i < fl; i += 64) s += flush[i];
        size_t part = total / splits[v] / 64 * 64;
        double t0 = now();
        for (int i = 0; i < splits[v]; i++) sink += sum(w + i * part, part, 2);
        ts[v][r] = now() - t0 + (s == 42 ? 1e-12 : 0);
    }
    for (int v = 0; v < ns; v++) {
        for (int i = 0; i < reps; i++) for (int j = i + 1; j < reps; j++) if (ts[v][j] < ts[v][i]) { double t = ts[v][i]; ts[v][i] = ts[v][j]; ts[v][j] = t; }
        printf("sum in %4d pieces: %.3f ms (%.1f GB/s)\n", splits[v], ts[v][reps/2] * 1e3, total / ts[v][reps/2] / 1e9);
    }
    return sink == 42;
}
