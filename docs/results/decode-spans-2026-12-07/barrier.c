#include <stdio.h>
#include <time.h>
#include <omp.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec * 1e-3; }
int main(void) {
    for (int r = 0; r < 3; r++) {
        double t0 = now();
#pragma omp parallel num_threads(2)
        for (int i = 0; i < 100000; i++) {
#pragma omp barrier
        }
        double t1 = now();
        int x[64] = {0};
#pragma omp parallel num_threads(2)
        for (int i = 0; i < 100000; i++) {
#pragma omp for schedule(static)
            for (int j = 0; j < 36; j++) x[j]++;
        }
        double t2 = now();
        printf("barrier %.3f us, omp for (36 iters) %.3f us\n", (t1 - t0) / 1e5, (t2 - t1) / 1e5);
    }
}
