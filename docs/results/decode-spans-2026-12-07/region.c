/* Per-region costs on this machine: an empty 2-thread region; a Q4_1 packed product at one
 * row for the built-in model's shapes, each call on a different copy (cold, as in a step). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>
int fleet_gguf_matmul_q8(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int type, float *y, int num_threads);
int fleet_gguf_repack(const uint8_t *from, int64_t n, int64_t k, int type, uint8_t *to, int num_threads);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec * 1e-3; }
static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }
int main(void)
{
    const int T_Q4_1 = 3, PACKED = 64;
    volatile int sink = 0;
    for (int r = 0; r < 3; r++) {
        double t0 = now();
        for (int i = 0; i < 100000; i++) {
#pragma omp parallel num_threads(2)
            { if (omp_get_thread_num() == 5) sink++; }
        }
        printf("empty region: %.2f us\n", (now() - t0) / 100000);
    }
    int64_t shapes[4][2] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};
    const char *names[4] = {"qkv", "o", "gate_up", "down"};
    for (int s = 0; s < 4; s++) {
        int64_t n = shapes[s][0], k = shapes[s][1], bytes = n * (k / 32) * 20;
        const int copies = (int)((96 << 20) / bytes) + 1; /* 96 MB: never in the L3 */
        uint8_t *rows = malloc(bytes);
        for (int64_t i = 0; i < bytes; i++) rows[i] = (uint8_t)(rand() & 0xff);
        for (int64_t i = 0; i < bytes; i += 20) { rows[i] = 0; rows[i + 1] = 0x3c; rows[i + 2] = 0; rows[i + 3] = 0; }
        uint8_t *w = aligned_alloc(64, (size_t)bytes * copies);
        fleet_gguf_repack(rows, n, k, T_Q4_1, w, 2);
        for (int c = 1; c < copies; c++) memcpy(w + c * bytes, w, bytes);
        float *x = malloc(k * 4), *y = malloc(n * 4);
        for (int i = 0; i < k; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
        double *t = malloc(sizeof(double) * copies * 3);
        int cnt = 0;
        for (int rep = 0; rep < 3; rep++)
            for (int c = 0; c < copies; c++) {
                /* evict: touch 64 MB elsewhere every call would be too slow; copies rotate */
                double t0 = now();
                fleet_gguf_matmul_q8(x, 1, k, w + c * bytes, n, T_Q4_1 | PACKED, y, 2);
                t[cnt++] = now() - t0;
            }
        qsort(t, cnt, sizeof(double), cmp);
        printf("%-8s %7.1f KB  median %6.2f us  -> %5.1f GB/s\n", names[s], bytes / 1e3, t[cnt / 2], bytes / t[cnt / 2] / 1e3);
    }
    return 0;
}
