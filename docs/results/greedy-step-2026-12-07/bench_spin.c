#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "vector.h"
int fleet_gguf_matmul_q8(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int type, float *y, int num_threads);
int fleet_gguf_matmul_q8_team(const void *xq, int64_t m, int64_t k, const uint8_t *w,
                              int64_t n, int type, float *y, tile_run *runs, int num_runs, int *status);
int64_t fleet_gguf_q8_tiles(int type, int64_t m, int64_t n);
int fleet_gguf_quantize_input(const float *x, int64_t m, int64_t k, void *xq);
typedef struct { int count; int gen; } spinbar;
static spinbar bar;
static inline void spin_barrier(spinbar *b, int n, int *sense) {
    int gen = __atomic_load_n(&b->gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == n) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->gen, gen + 1, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&b->gen, __ATOMIC_ACQUIRE) == gen) __builtin_ia32_pause();
    }
    (void)sense;
}
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
#define L 30
#define R 21
int main(int argc, char **argv) {
    const int64_t n = atoi(argv[1]), k = atoi(argv[2]); const int threads = atoi(argv[3]);
    const int type = 3 | 64; /* Q4_1 packed */
    const int64_t row_bytes = k / 32 * 20, bytes = n * row_bytes;
    uint8_t *w[L]; uint8_t *big = aligned_alloc(64, (size_t)(bytes * L));
    memset(big, 0x3C, bytes * L);
    for (int l = 0; l < L; l++) { w[l] = aligned_alloc(64, bytes); memset(w[l], 0x3C, bytes); }
    size_t fl = 128u << 20; volatile uint8_t *flush = malloc(fl); memset((void*)flush, 1, fl);
    float *x = malloc(k * 4), *y = malloc(n * L * 4);
    for (int i = 0; i < k; i++) x[i] = (float)(i % 7) - 3.0f;
    void *xq = malloc(k / 32 * 40);
    tile_run *runs = aligned_alloc(64, L * threads * sizeof(tile_run));
    double ts[3][R];
    for (int r = 0; r < R; r++) {
        for (int v = 0; v < 3; v++) {
            uint64_t s = 0; for (size_t i = 0; i < fl; i += 64) s += flush[i];
            double t0 = now();
            if (v == 0) for (int l = 0; l < L; l++) fleet_gguf_matmul_q8(x, 1, k, w[l], n, type, y, threads);
            else if (v == 1) fleet_gguf_matmul_q8(x, 1, k, big, n * L, type, y, threads);
            else {
                for (int l = 0; l < L; l++) tile_runs_init(runs + l * threads, threads, fleet_gguf_q8_tiles(type, 1, n));
                int status = 0;
#pragma omp parallel num_threads(threads)
                {
                int sense = 0;
                for (int l = 0; l < L; l++) {
                    if (omp_get_thread_num() == 0) fleet_gguf_quantize_input(x, 1, k, xq);
                    spin_barrier(&bar, threads, &sense);
                    fleet_gguf_matmul_q8_team(xq, 1, k, w[l], n, type, y, runs + l * threads, threads, &status);
                    spin_barrier(&bar, threads, &sense);
                }
                }
            }
            ts[v][r] = now() - t0 + (s == 42 ? 1e-12 : 0);
        }
    }
    const char *names[3] = {"30 products", "one product", "30 in a team"};
    for (int v = 0; v < 3; v++) {
        for (int i = 0; i < R; i++) for (int j = i + 1; j < R; j++) if (ts[v][j] < ts[v][i]) { double t = ts[v][i]; ts[v][i] = ts[v][j]; ts[v][j] = t; }
        printf("%s: median %.3f ms (%.1f GB/s), per product %.1f us\n", names[v], ts[v][R/2] * 1e3, bytes * L / ts[v][R/2] / 1e9, ts[v][R/2] * 1e6 / (v == 1 ? 1 : L));
    }
    return 0;
}
