#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
int fleet_paged_attention(const float *query, const void *k_cache, const void *v_cache,
                          int kv_dtype, int64_t num_blocks, int64_t block_size,
                          int64_t num_kv_heads, int64_t head_dim, const int32_t *cu_seqlens_q,
                          const int32_t *seq_lens, const int32_t *block_tables,
                          int64_t max_blocks, int64_t num_seqs, int64_t num_heads,
                          int64_t tokens_per_task, float scale, float *out, int num_threads);
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc, char **argv) {
    int kv_dtype = atoi(argv[1]);  /* 0 fp32, 2 int8 */
    const int64_t nb = 64, bs = 16, kvh = 3, hd = 64, nh = 9, row = kv_dtype == 2 ? hd + 4 : hd * 4;
    uint8_t *k = malloc(nb * bs * kvh * row), *v = malloc(nb * bs * kvh * row);
    for (int64_t i = 0; i < nb * bs * kvh * row; i++) { k[i] = (uint8_t)(i * 7); v[i] = (uint8_t)(i * 13); }
    if (kv_dtype == 2) for (int64_t r = 0; r < nb * bs * kvh; r++) { float s = 0.01f; memcpy(k + r * row + hd, &s, 4); memcpy(v + r * row + hd, &s, 4); }
    else { float *kf = (float *)k, *vf = (float *)v; for (int64_t i = 0; i < nb * bs * kvh * hd; i++) { kf[i] = (i % 17) * 0.01f; vf[i] = (i % 13) * 0.01f; } }
    float q[9 * 64], out[9 * 64]; for (int i = 0; i < 9 * 64; i++) q[i] = (i % 11) * 0.1f;
    int32_t tables[64]; for (int i = 0; i < 64; i++) tables[i] = i;
    int kvs[] = {1, 8, 32, 64, 128, 256};
    for (int i = 0; i < 6; i++) {
        int32_t seq = kvs[i]; int reps = 20000;
        double t0 = now();
        for (int r = 0; r < reps; r++) fleet_paged_attention(q, k, v, kv_dtype, nb, bs, kvh, hd, NULL, &seq, tables, 64, 1, nh, 1, 0.125f, out, atoi(argv[2]));
        printf("kv_dtype %d kv %3d: %.2f us/call\n", kv_dtype, kvs[i], (now() - t0) / reps * 1e6);
    }
}
