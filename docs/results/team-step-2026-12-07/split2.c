#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
int fleet_gguf_matmul_q8(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int type, float *y, int num_threads);
extern __thread int fleet_team_id, fleet_team_n;
static volatile int bar_count, bar_sense;
static void spin_barrier(int n, int *local) {
    *local = !*local;
    if (__atomic_add_fetch(&bar_count, 1, __ATOMIC_ACQ_REL) == n) { bar_count = 0; __atomic_store_n(&bar_sense, *local, __ATOMIC_RELEASE); }
    else while (__atomic_load_n(&bar_sense, __ATOMIC_ACQUIRE) != *local) __builtin_ia32_pause();
}
extern const uint8_t *fleet_next_w; extern int64_t fleet_next_n, fleet_next_row_bytes;
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc, char **argv) {
    const int64_t k = 576, row = 360, total_rows = 184320; /* 66 MB */
    size_t total = total_rows * row;
    uint8_t *p = mmap(NULL, total + (4u<<20), PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    uint8_t *w = (uint8_t *)(((uintptr_t)p + (2u<<20) - 1) & ~(uintptr_t)((2u<<20)-1));
    madvise(w, total, MADV_HUGEPAGE); memset(w, 0x3C, total);
    size_t fl = 128u << 20; volatile uint8_t *flush = malloc(fl); memset((void*)flush, 1, fl);
    float *x = malloc(k * 4), *y = malloc(total_rows * 4); for (int i = 0; i < k; i++) x[i] = i % 5;
    int splits[] = {1, 8, 30, 120, 480}; const int ns = 5, reps = 41; int hint = argc == 2;
    double ts[5][41];
    for (int r = 0; r < reps; r++) for (int v = 0; v < ns; v++) {
        uint64_t s = 0; for (size_t i = 0; i < fl; i += 64) s += flush[i];
        int64_t part = total_rows / splits[v];
        double t0 = now();
        if (argc > 2) {
#pragma omp parallel num_threads(2)
          { int local = bar_sense; fleet_team_id = omp_get_thread_num(); fleet_team_n = 2;
            for (int i = 0; i < splits[v]; i++) { fleet_gguf_matmul_q8(x, 1, k, w + i * part * row, part, 3 | 64, y + i * part, 2); spin_barrier(2, &local); }
            fleet_team_n = 0; }
        } else
        for (int i = 0; i < splits[v]; i++) {
            if (hint && i + 1 < splits[v]) { fleet_next_w = w + (i + 1) * part * row; fleet_next_n = part; fleet_next_row_bytes = row; } else fleet_next_w = 0;
            fleet_gguf_matmul_q8(x, 1, k, w + i * part * row, part, 3 | 64, y + i * part, 2);
        }
        ts[v][r] = now() - t0 + (s == 42 ? 1e-12 : 0);
    }
    for (int v = 0; v < ns; v++) {
        for (int i = 0; i < reps; i++) for (int j = i + 1; j < reps; j++) if (ts[v][j] < ts[v][i]) { double t = ts[v][i]; ts[v][i] = ts[v][j]; ts[v][j] = t; }
        printf("%s%s%4d products: %.3f ms (%.1f GB/s)\n", hint ? "hint " : "", argc > 2 ? "team " : "", splits[v], ts[v][reps/2] * 1e3, total / ts[v][reps/2] / 1e9);
    }
}
