#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
int fleet_gguf_matmul_q8(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int type, float *y, int num_threads);
int fleet_gguf_quantize_input(const float *x, int64_t m, int64_t k, void *xq);
typedef struct { float d, s; int8_t q[32]; } xblock;
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
#ifndef T
#define T 4
#endif
__attribute__((noinline)) void kern(const xblock *x, int64_t blocks, const uint8_t *w, int64_t n, float *y) {
    const int64_t tile_bytes = blocks * 160;
    const __m256i mask = _mm256_set1_epi8(0xF), ones = _mm256_set1_epi16(1);
    for (int64_t t0 = 0; t0 < n / 8; t0 += T) {
        __m256 acc[T];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
        const uint8_t *tp = w + t0 * tile_bytes;
        for (int64_t b = 0; b < blocks; b++) {
            const xblock *xb = &x[b];
            __m256i xg[8];
            for (int g = 0; g < 8; g++) { int32_t v; memcpy(&v, xb->q + 4 * g, 4); xg[g] = _mm256_set1_epi32(v); }
            const __m256 xd = _mm256_set1_ps(xb->d), xs = _mm256_set1_ps(xb->s);
            for (int t = 0; t < T; t++) {
                const uint8_t *p = tp + t * tile_bytes + b * 160;
                __m256i s16 = _mm256_setzero_si256(), s16b = _mm256_setzero_si256();
                for (int g = 0; g < 4; g++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * g));
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(v, mask), xg[g]));
                    s16b = _mm256_add_epi16(s16b, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), xg[g + 4]));
                }
                const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(s16, s16b), ones));
                const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 128)));
                const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 144)));
                acc[t] = _mm256_fmadd_ps(dots, _mm256_mul_ps(d, xd), acc[t]);
                acc[t] = _mm256_fmadd_ps(mn, xs, acc[t]);
            }
        }
        for (int t = 0; t < T; t++) _mm256_storeu_ps(y + (t0 + t) * 8, acc[t]);
    }
}
int main(int argc, char **argv) {
    int64_t n = 768, k = 576, blocks = k / 32; size_t bytes = n * blocks * 20;
    uint8_t *w = aligned_alloc(4096, bytes); for (size_t i = 0; i < bytes; i++) w[i] = (uint8_t)(i * 2654435761u >> 13);
    for (size_t t = 0; t < (size_t)n / 8; t++) for (int b = 0; b < blocks; b++) { uint16_t *h = (uint16_t *)(w + t * blocks * 160 + b * 160 + 128); for (int i = 0; i < 16; i++) h[i] = 0x2000 + (i * 37 % 500); }
    float *x = malloc(k * 4), *y = malloc(n * 4), *y2 = malloc(n * 4);
    for (int i = 0; i < k; i++) x[i] = (float)((i * 7) % 13) - 6.0f;
    xblock *xq = aligned_alloc(64, blocks * sizeof(xblock)); fleet_gguf_quantize_input(x, 1, k, xq);
    fleet_gguf_matmul_q8(x, 1, k, w, n, 3 | 64, y, 1); kern(xq, blocks, w, n, y2);
    double err = 0; for (int i = 0; i < n; i++) { double e = y[i] - y2[i]; if (e < 0) e = -e; if (e > err) err = e; }
    int reps = 20000;
    for (int round = 0; round < 2; round++) {
    double t0 = now();
    for (int r = 0; r < reps; r++) fleet_gguf_matmul_q8(x, 1, k, w, n, 3 | 64, y, 1);
    double ta = now() - t0; t0 = now();
    for (int r = 0; r < reps; r++) { fleet_gguf_quantize_input(x, 1, k, xq); kern(xq, blocks, w, n, y2); }
    double tb = now() - t0;
    printf("T=%d lib %.1f GB/s, kern %.1f GB/s, max err %.2g (y0 %g)\n", T, bytes * (double)reps / ta / 1e9, bytes * (double)reps / tb / 1e9, err, y[0]);
    }
}
