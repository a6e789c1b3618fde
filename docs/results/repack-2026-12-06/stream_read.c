/* How fast this machine streams the built-in model's Q4_1 layer matrices (qkv, o, gate_up,
 * down: 30 layers, 66 MB) with two threads: in one parallel region over all of it (mode 1),
 * one region per matrix as the products run (mode 0), and one per matrix with a 5 us serial
 * gap after each (mode 2, the step's norms and attention). Best of 20. docs/benchmarks.md,
 * "Weights repacked at load":
 *
 *     gcc -O2 -mavx2 -fopenmp stream_read.c -o /tmp/stream_read && /tmp/stream_read
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
static __m256i touch(const char *p, size_t n) {
  __m256i acc = _mm256_setzero_si256();
  for (size_t i = 0; i < n; i += 32) acc = _mm256_add_epi8(acc, _mm256_loadu_si256((const __m256i*)(p+i)));
  return acc;
}
int main(int argc, char **argv){
  size_t sizes[4] = {345600, 207360, 1105920, 552960};
  size_t layer = 0; for (int i=0;i<4;i++) layer += sizes[i];
  size_t total = layer * 30;
  char *buf = aligned_alloc(64, total); memset(buf, 1, total);
  volatile int sink = 0;
  for (int rep = 0; rep < 3; rep++) {
    double best = 1e9;
    for (int it = 0; it < 20; it++) {
      double t0 = omp_get_wtime();
      if (rep == 0) { /* one region per matrix */
        char *p = buf;
        for (int l = 0; l < 30; l++) for (int i = 0; i < 4; i++) {
          size_t n = sizes[i];
          #pragma omp parallel num_threads(2)
          { int t = omp_get_thread_num(); __m256i a = touch(p + t*(n/2), n/2); sink += _mm256_extract_epi32(a,0); }
          p += n;
        }
      } else if (rep == 1) { /* one region, whole */
        #pragma omp parallel num_threads(2)
        { int t = omp_get_thread_num(); __m256i a = touch(buf + t*(total/2), total/2); sink += _mm256_extract_epi32(a,0); }
      } else { /* per matrix, with a 16us serial gap (attention etc.) */
        char *p = buf;
        for (int l = 0; l < 30; l++) for (int i = 0; i < 4; i++) {
          size_t n = sizes[i];
          #pragma omp parallel num_threads(2)
          { int t = omp_get_thread_num(); __m256i a = touch(p + t*(n/2), n/2); sink += _mm256_extract_epi32(a,0); }
          p += n;
          double g = omp_get_wtime(); while (omp_get_wtime() - g < 5e-6) ;
        }
      }
      double dt = omp_get_wtime() - t0; if (dt < best) best = dt;
    }
    printf("mode %d: %.3f ms, %.1f GB/s\n", rep, best*1e3, total/best/1e9);
  }
}
