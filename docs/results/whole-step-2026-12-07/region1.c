#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
float a[576], b[576];
__attribute__((noinline)) void region(int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < 576; i++) a[i] += b[i];
}
__attribute__((noinline)) void region_if(int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (0)
    for (int i = 0; i < 576; i++) a[i] += b[i];
}
__attribute__((noinline)) void plain(void) { for (int i = 0; i < 576; i++) a[i] += b[i]; }
int main(void) {
    const int reps = 200000;
    for (int pass = 0; pass < 2; pass++) {
        double t0 = now(); for (int r = 0; r < reps; r++) region(1); double t1 = now();
        for (int r = 0; r < reps; r++) region_if(2); double t2 = now();
        for (int r = 0; r < reps; r++) plain(); double t3 = now();
        for (int r = 0; r < reps; r++) region(2); double t4 = now();
        printf("num_threads(1) region %.3f us, if(0) region %.3f us, no region %.3f us, 2-thread region %.3f us\n",
               (t1 - t0) / reps * 1e6, (t2 - t1) / reps * 1e6, (t3 - t2) / reps * 1e6, (t4 - t3) / reps * 1e6);
    }
    return 0;
}
