#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
int fleet_gguf_matmul_q8(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int type, float *y, int num_threads);
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
/* tiny products (8 rows): what a call costs beyond its bytes, warm */
int main(int argc, char **argv) {
    const int64_t n = atoi(argv[1]), k = atoi(argv[2]); const int threads = atoi(argv[3]); const int reps = atoi(argv[4]);
    const int64_t bytes = n * (k / 32 * 20);
    uint8_t *w = aligned_alloc(64, bytes); memset(w, 0x3C, bytes);
    float *x = malloc(k * 4), *y = malloc(n * 4);
    for (int i = 0; i < k; i++) x[i] = (float)(i % 7) - 3.0f;
    double t0 = now();
    for (int r = 0; r < reps; r++) fleet_gguf_matmul_q8(x, 1, k, w, n, 3 | 64, y, threads);
    printf("n %ld k %ld threads %d: %.2f us a call\n", (long)n, (long)k, threads, (now() - t0) / reps * 1e6);
    return 0;
}
