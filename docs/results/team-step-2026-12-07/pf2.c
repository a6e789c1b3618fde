#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
int fleet_gguf_matmul_q8(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int type, float *y, int num_threads);
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
static uint8_t *alloc(size_t bytes) {
    size_t sz = bytes + (2u << 20);
    uint8_t *p = mmap(NULL, sz, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    uint8_t *a = (uint8_t *)(((uintptr_t)p + (2u<<20) - 1) & ~(uintptr_t)((2u<<20)-1));
    madvise(a, bytes, MADV_HUGEPAGE);
    memset(a, 0x3C, bytes);
    return a;
}
typedef struct { int64_t n, k; int type; uint8_t *w; size_t bytes; } Mat;
int main(int argc, char **argv) {
    const int threads = 2;
    Mat mats[121]; int nm = 0; size_t total = 0;
    for (int l = 0; l < 30; l++) {
        int64_t ns[4] = {960, 576, 3072, 576}, ks[4] = {576, 576, 576, 1536};
        for (int j = 0; j < 4; j++) { mats[nm].n = ns[j]; mats[nm].k = ks[j]; mats[nm].type = 3 | 64;
            mats[nm].bytes = ns[j] * (ks[j] / 32 * 20); total += mats[nm].bytes; nm++; }
    }
    mats[nm].n = 49152; mats[nm].k = 576; mats[nm].type = 8 | 64; mats[nm].bytes = 49152 * 18 * 34; total += mats[nm].bytes; nm++;
    uint8_t *arena = alloc(total); size_t off = 0;
    for (int i = 0; i < nm; i++) { mats[i].w = arena + off; off += mats[i].bytes; }
    size_t fl = 128u << 20; volatile uint8_t *flush = malloc(fl); memset((void*)flush, 1, fl);
    float *x = malloc(1536 * 4), *y = malloc(49152 * 4);
    for (int i = 0; i < 1536; i++) x[i] = (float)(i % 7) - 3.0f;
    int xs[] = {0, 2, 4, 8, 12, 16, 24}; const int nx = 7, reps = 41;
    double ts[7][41];
    for (int r = 0; r < reps; r++) for (int v = 0; v < nx; v++) {
        uint64_t s = 0; for (size_t i = 0; i < fl; i += 64) s += flush[i];
        size_t pre = (size_t)xs[v] << 20;
        for (size_t i = 0; i < pre && i < total; i += 64) s += arena[i];
        double t0 = now();
        for (int i = 0; i < nm; i++) fleet_gguf_matmul_q8(x, 1, mats[i].k, mats[i].w, mats[i].n, mats[i].type, y, threads);
        ts[v][r] = now() - t0 + (s == 42 ? 1e-12 : 0);
    }
    for (int v = 0; v < nx; v++) {
        for (int i = 0; i < reps; i++) for (int j = i + 1; j < reps; j++) if (ts[v][j] < ts[v][i]) { double t = ts[v][i]; ts[v][i] = ts[v][j]; ts[v][j] = t; }
        printf("prefetched %2d MB: %.3f ms (min %.3f) %.1f GB/s\n", xs[v], ts[v][reps/2]*1e3, ts[v][0]*1e3, total / ts[v][reps/2] / 1e9);
    }
    printf("total %.1f MB\n", total / 1e6);
    return 0;
}
