/* A decode step through a stack of Llama decoder layers whose matrices are GGUF Q4_0 / Q4_1 /
 * Q8_0 blocks, over an fp32 or int8 KV cache, in one call: per layer residual add + RMSNorm,
 * the qkv product, rotary on q and k, the K/V write, paged decode attention, the o product,
 * add + RMSNorm, the gate/up product, SiLU(gate) * up and the down product.
 *
 * It calls the very kernels the Python layer loop calls (fused_ops.c, gguf_matmul.c,
 * paged_attention.c are linked into the same library), with the same arguments, so its
 * results equal that loop's bit for bit. What it removes is the loop itself: at one row a
 * layer's arithmetic is a few hundred microseconds, and the Python around its ten kernel
 * calls (modules, views, entry checks, ctypes) was a third of a step. Below TEAM_MAX_ROWS
 * rows it also removes the kernels' own OpenMP regions: the layers run as one team
 * (team.h), each thread taking its share of every product and of attention.
 *
 * Compiled at first use by fleetlm/kernels/cpu_build.py with those three sources and called
 * through ctypes by fleetlm/kernels/decode_stack.py, which states the contract.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"

/* The kernels, from the sources linked beside this one. */
int fleet_add_rms_norm(void *x, const void *residual, const void *weight, void *out,
                       int64_t rows, int64_t dim, float eps, int is_bf16, int num_threads);
int fleet_silu_mul(const void *gate_up, void *out, int64_t rows, int64_t n, int is_bf16,
                   int num_threads);
int fleet_rotary(void *x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride,
                 const float *cos, const float *sin, int is_bf16, int num_threads);
int fleet_write_kv(const void *key, const void *value, int64_t token_stride_k,
                   int64_t head_stride_k, int64_t token_stride_v, int64_t head_stride_v,
                   const int64_t *slot_mapping, int64_t num_tokens, int64_t num_kv_heads,
                   int64_t head_dim, int64_t num_slots, void *k_cache, void *v_cache,
                   int is_bf16, int num_threads);
int fleet_gguf_matmul_q8(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int type, float *y, int num_threads);
int fleet_gguf_matmul_q8_team(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                              int type, float *y, const Team *t);
int fleet_write_kv_int8(const void *key, const void *value, int is_bf16, int64_t token_stride_k,
                        int64_t head_stride_k, int64_t token_stride_v, int64_t head_stride_v,
                        const int64_t *slot_mapping, int64_t num_tokens, int64_t num_kv_heads,
                        int64_t head_dim, int64_t num_slots, int8_t *k_cache, int8_t *v_cache,
                        int num_threads);
int fleet_gguf_dequantize_rows(const uint8_t *w, int64_t n, int64_t k, int type,
                               const int64_t *ids, int64_t count, float *out, int num_threads);
int fleet_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out,
                      int num_threads);
int fleet_paged_attention(const float *query, const void *k_cache, const void *v_cache,
                          int kv_dtype, int64_t num_blocks, int64_t block_size,
                          int64_t num_kv_heads, int64_t head_dim, const int32_t *cu_seqlens_q,
                          const int32_t *seq_lens, const int32_t *block_tables,
                          int64_t max_blocks, int64_t num_seqs, int64_t num_heads,
                          int64_t tokens_per_task, float scale, float *out, int num_threads);
int64_t fleet_paged_attention_span_floats(int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                          int threads);
int fleet_paged_attention_team(const float *query, const void *k_cache, const void *v_cache,
                               int kv_dtype, int64_t num_blocks, int64_t block_size,
                               int64_t num_kv_heads, int64_t head_dim, const int32_t *seq_lens,
                               const int32_t *block_tables, int64_t max_blocks, int64_t num_seqs,
                               int64_t num_heads, float scale, float *out, float *spans,
                               const Team *t);

/* Status codes: a kernel's own code is returned as STAGE * 16 + code with the failing layer
 * in *failed_layer (decode_stack.py names them). */
enum { OK = 0, ERR_NO_MEMORY = 1, ERR_RANGE = 2 };
enum { STAGE_QKV = 1, STAGE_KV_WRITE, STAGE_ATTENTION, STAGE_O, STAGE_GATE_UP, STAGE_DOWN,
       STAGE_EMBEDDING, STAGE_ROTARY, STAGE_LM_HEAD };

/* One layer: its norms' fp32 weights, its four matrices (GGUF blocks and type), its caches
 * ([num_blocks, block_size, num_kv_heads, row]: fp32 rows of head_dim, or int8 rows of
 * head_dim + 4, kv_quant.py's layout). Mirrored by LayerWeights in decode_stack.py. */
typedef struct {
    const float *input_norm, *post_norm;
    const uint8_t *qkv, *o, *gate_up, *down;
    int32_t qkv_type, o_type, gate_up_type, down_type;
    void *k_cache, *v_cache;
} LayerWeights;

/* The stack's shapes and its caches' dtype (paged_attention.c's code: 0 fp32, 2 int8);
 * mirrored by StackShape in decode_stack.py. */
typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate;
    int64_t num_blocks, block_size;
    float eps, scale;
    int32_t kv_dtype;
} StackShape;

enum { KV_INT8 = 2 }; /* paged_attention.c's code for an int8 cache */

/* Below this many rows a stack runs as one team (team.h): one OpenMP region for the whole
 * stack, the products' tiles and attention's tasks shared out by hand, the steps met at
 * team_sync, instead of a region per product and per attention. From here a product's
 * arithmetic dwarfs a region's cost, and quantizing the input rows once for all threads
 * pays (each thread of a team quantizes them itself). */
#define TEAM_MAX_ROWS 8

/* The stack's buffers: shared by a team's threads, or one thread's own (each thread keeps
 * the running residual, the normed rows and the activation itself: the same values, computed
 * beside each other, instead of a sync after each). */
typedef struct {
    float *qkv, *query, *attended, *o, *gate_up, *down, *spans; /* shared */
} Shared;
typedef struct {
    float *residual, *normed, *act;
} Own;

/* A stage's failure, code STAGE * 16 + the kernel's, seen by the whole team: each thread
 * reports its own, syncs, and takes the team's (the first), so every thread leaves the loop
 * at the same stage. */
static int stage_status(const Team *t, int status, int stage)
{
    team_fail(t, status ? stage * 16 + status : 0);
    team_sync(t);
    return team_status(t);
}

/* The layers, by one thread (t of one: each kernel with num_threads, in a region of its own)
 * or by each thread of a team (its share of each product and of attention; rotary, the K/V
 * write and the query's gather by thread 0). Returns 0 or the stage's code; `out` is where
 * the last layer's output is. */
static int run_layers(const Team *t, const LayerWeights *layers, int64_t num_layers,
                      const StackShape *s, int64_t m, const float *hidden, int has_residual,
                      const float *cos, const float *sin, const int64_t *slot_mapping,
                      const int32_t *seq_lens, const int32_t *block_tables, int64_t max_blocks,
                      int num_threads, const Shared *sh, const Own *own, int64_t *failed_layer,
                      const float **out_rows)
{
    const int64_t q_width = s->num_heads * s->head_dim, kv_width = s->num_kv_heads * s->head_dim;
    const int64_t qkv_width = q_width + 2 * kv_width, hidden_width = s->hidden;
    const int64_t num_slots = s->num_blocks * s->block_size;
    const int team = t->size > 1, threads = team ? 1 : num_threads; /* for the small kernels */
    const float *out = hidden; /* the previous layer's output */
    int status = OK;
#define PRODUCT(x, k, w, type, n, y)                                                          \
    (team ? fleet_gguf_matmul_q8_team(x, m, k, w, n, type, y, t)                              \
          : fleet_gguf_matmul_q8(x, m, k, w, n, type, y, num_threads))
    for (int64_t l = 0; l < num_layers; l++) {
        const LayerWeights *w = &layers[l];
        if (t->id == 0) *failed_layer = l;
        /* residual += out (the sum is commutative, so this is the loop's out += residual),
         * except where hidden itself is the residual. */
        const int is_first = l == 0 && !has_residual;
        fleet_add_rms_norm(own->residual, is_first ? NULL : out, w->input_norm, own->normed, m,
                           hidden_width, s->eps, 0, threads);
        status = PRODUCT(own->normed, hidden_width, w->qkv, w->qkv_type, qkv_width, sh->qkv);
        if ((status = stage_status(t, status, STAGE_QKV))) break;
        if (t->id == 0) {
            fleet_rotary(sh->qkv, m, s->num_heads + s->num_kv_heads, s->head_dim, qkv_width,
                         cos, sin, 0, threads);
            const float *key = sh->qkv + q_width, *value = key + kv_width;
            if (s->kv_dtype == KV_INT8)
                status = fleet_write_kv_int8(key, value, 0, qkv_width, s->head_dim, qkv_width,
                                             s->head_dim, slot_mapping, m, s->num_kv_heads,
                                             s->head_dim, num_slots, w->k_cache, w->v_cache,
                                             threads);
            else
                status = fleet_write_kv(key, value, qkv_width, s->head_dim, qkv_width,
                                        s->head_dim, slot_mapping, m, s->num_kv_heads,
                                        s->head_dim, num_slots, w->k_cache, w->v_cache, 0,
                                        threads);
            for (int64_t r = 0; r < m; r++)
                memcpy(sh->query + r * q_width, sh->qkv + r * qkv_width,
                       (size_t)q_width * sizeof(float));
        }
        if ((status = stage_status(t, status, STAGE_KV_WRITE))) break;
        if (team)
            status = fleet_paged_attention_team(
                sh->query, w->k_cache, w->v_cache, s->kv_dtype, s->num_blocks, s->block_size,
                s->num_kv_heads, s->head_dim, seq_lens, block_tables, max_blocks, m,
                s->num_heads, s->scale, sh->attended, sh->spans, t);
        else
            status = fleet_paged_attention(
                sh->query, w->k_cache, w->v_cache, s->kv_dtype, s->num_blocks, s->block_size,
                s->num_kv_heads, s->head_dim, NULL, seq_lens, block_tables, max_blocks, m,
                s->num_heads, 1, s->scale, sh->attended, num_threads);
        if ((status = stage_status(t, status, STAGE_ATTENTION))) break;
        status = PRODUCT(sh->attended, q_width, w->o, w->o_type, hidden_width, sh->o);
        if ((status = stage_status(t, status, STAGE_O))) break;
        fleet_add_rms_norm(own->residual, sh->o, w->post_norm, own->normed, m, hidden_width,
                           s->eps, 0, threads);
        status = PRODUCT(own->normed, hidden_width, w->gate_up, w->gate_up_type,
                         2 * s->intermediate, sh->gate_up);
        if ((status = stage_status(t, status, STAGE_GATE_UP))) break;
        fleet_silu_mul(sh->gate_up, own->act, m, s->intermediate, 0, threads);
        status = PRODUCT(own->act, s->intermediate, w->down, w->down_type, hidden_width,
                         sh->down);
        if ((status = stage_status(t, status, STAGE_DOWN))) break;
        out = sh->down;
    }
#undef PRODUCT
    *out_rows = out;
    return status;
}

/* m decode rows (one token of each of m sequences) through the layers. hidden [m, hidden]:
 * the stack's input on entry, the last layer's output (its MLP's) on return. residual
 * [m, hidden]: the running residual, read on entry if has_residual (otherwise hidden is the
 * residual, as in the first layer of a model) and the stack's residual on return. cos / sin
 * [m, head_dim / 2] of each row's position; slot_mapping [m]; seq_lens [m] (kv length with
 * this token); block_tables [m, max_blocks]. Returns 0, or a stage's failure with nothing
 * further computed. Below TEAM_MAX_ROWS rows, on more than one thread, the layers run as one
 * team; the results are the same bit for bit (each output of a product or of attention is
 * computed alike, whichever thread computes it). */
int fleet_decode_stack(const LayerWeights *layers, int64_t num_layers, const StackShape *s,
                       int64_t m, float *hidden, float *residual, int has_residual,
                       const float *cos, const float *sin, const int64_t *slot_mapping,
                       const int32_t *seq_lens, const int32_t *block_tables,
                       int64_t max_blocks, int num_threads, int64_t *failed_layer)
{
    const int64_t q_width = s->num_heads * s->head_dim, kv_width = s->num_kv_heads * s->head_dim;
    const int64_t qkv_width = q_width + 2 * kv_width, hidden_width = s->hidden;
    const int team = num_threads > 1 && m < TEAM_MAX_ROWS;
    const int64_t spans = team ? fleet_paged_attention_span_floats(m, s->num_heads, s->head_dim,
                                                                    num_threads) : 0;
    /* Shared rows: qkv, the query heads gathered, attention's output, the o product,
     * gate|up, the down product; then the spans; then each thread's own normed rows and
     * activation, and (threads after the first) its residual. */
    const int64_t shared_row = qkv_width + 2 * q_width + hidden_width + 2 * s->intermediate +
                               hidden_width;
    const int64_t own_row = hidden_width + s->intermediate + hidden_width;
    const int own_sets = team ? num_threads : 1;
    float *scratch = malloc((size_t)(m * shared_row + spans + own_sets * m * own_row)
                            * sizeof(float));
    if (!scratch) return ERR_NO_MEMORY;
    Shared sh;
    sh.qkv = scratch;
    sh.query = sh.qkv + m * qkv_width;
    sh.attended = sh.query + m * q_width;
    sh.o = sh.attended + m * q_width;
    sh.gate_up = sh.o + m * hidden_width;
    sh.down = sh.gate_up + m * 2 * s->intermediate;
    sh.spans = sh.down + m * hidden_width;
    float *own_scratch = sh.spans + spans;
    if (!has_residual) memcpy(residual, hidden, (size_t)(m * hidden_width) * sizeof(float));
    TeamShared shared = {0};
    const float *out = hidden;
    int status = OK;
    if (team) {
#pragma omp parallel num_threads(num_threads)
        {
            const Team t = {omp_get_thread_num(), omp_get_num_threads(), &shared};
            float *mine = own_scratch + t.id * m * own_row;
            const Own own = {t.id == 0 ? residual : mine + m * (hidden_width + s->intermediate),
                             mine, mine + m * hidden_width};
            /* the residual's start: the first thread's is the caller's, each other's a copy
             * taken before the first thread changes it */
            if (t.id > 0)
                memcpy(own.residual, residual, (size_t)(m * hidden_width) * sizeof(float));
            team_sync(&t);
            const float *last;
            const int done = run_layers(&t, layers, num_layers, s, m, hidden, has_residual, cos,
                                        sin, slot_mapping, seq_lens, block_tables, max_blocks,
                                        num_threads, &sh, &own, failed_layer, &last);
            if (t.id == 0) {
                status = done;
                out = last;
            }
        }
    } else {
        const Team t = team_of_one(&shared);
        const Own own = {residual, own_scratch, own_scratch + m * hidden_width};
        status = run_layers(&t, layers, num_layers, s, m, hidden, has_residual, cos, sin,
                            slot_mapping, seq_lens, block_tables, max_blocks, num_threads, &sh,
                            &own, failed_layer, &out);
    }
    if (status == OK && out != hidden)
        memcpy(hidden, out, (size_t)(m * hidden_width) * sizeof(float));
    free(scratch);
    return status;
}

/* What a whole model adds around its stack (fleet_decode_model): the token embedding (GGUF
 * rows of `embedding_type`, dequantized), the rotary tables ([max_position, head_dim / 2]
 * fp32 each) and the final norm's fp32 weight. Mirrored by ModelEnds in decode_stack.py. */
typedef struct {
    const uint8_t *embedding;
    int32_t embedding_type;
    int64_t vocab, max_position;
    const float *cos_table, *sin_table, *final_norm;
    float final_eps;
} ModelEnds;

/* A decode step of a whole model, one token of each of m sequences: the embedding rows of
 * token_ids, cos / sin looked up at positions, the stack, then residual add + the final norm
 * into `normed` [m, hidden]. `hidden` and `residual` [m, hidden] are scratch (on return the
 * last layer's output summed with the residual, and the residual). The same kernels as the
 * model's Python around fleet_decode_stack, with the same arguments, so the result is the
 * same bit for bit; what goes is that Python (embedding, rotary lookup, final norm: 0.35 ms of
 * a 7.9 ms step on the 2-vCPU EPYC, run cold after the stack has streamed the weights).
 * Returns 0 or fleet_decode_stack's codes; STAGE_EMBEDDING / STAGE_ROTARY * 16 + ERR_RANGE
 * for a token id or a position outside its table, with nothing computed. */
int fleet_decode_model(const LayerWeights *layers, int64_t num_layers, const StackShape *s,
                       const ModelEnds *e, int64_t m, const int64_t *token_ids,
                       const int64_t *positions, float *hidden, float *residual, float *normed,
                       const int64_t *slot_mapping, const int32_t *seq_lens,
                       const int32_t *block_tables, int64_t max_blocks, int num_threads,
                       int64_t *failed_layer)
{
    *failed_layer = 0;
    for (int64_t t = 0; t < m; t++)
        if (positions[t] < 0 || positions[t] >= e->max_position)
            return STAGE_ROTARY * 16 + ERR_RANGE;
    const int embedded = fleet_gguf_dequantize_rows(e->embedding, e->vocab, s->hidden,
                                                    e->embedding_type, token_ids, m, hidden,
                                                    num_threads);
    if (embedded) return STAGE_EMBEDDING * 16 + embedded; /* 2: an id past the vocabulary */
    const int64_t half = s->head_dim / 2;
    float *cos = malloc((size_t)(2 * m * half) * sizeof(float));
    if (!cos) return ERR_NO_MEMORY;
    float *sin = cos + m * half;
    for (int64_t t = 0; t < m; t++) {
        memcpy(cos + t * half, e->cos_table + positions[t] * half, (size_t)half * sizeof(float));
        memcpy(sin + t * half, e->sin_table + positions[t] * half, (size_t)half * sizeof(float));
    }
    int status = fleet_decode_stack(layers, num_layers, s, m, hidden, residual, 0, cos, sin,
                                    slot_mapping, seq_lens, block_tables, max_blocks,
                                    num_threads, failed_layer);
    free(cos);
    if (status == OK)
        fleet_add_rms_norm(hidden, residual, e->final_norm, normed, m, s->hidden, e->final_eps,
                           0, num_threads);
    return status;
}

/* fleet_decode_model, then the LM head and each row's argmax: the greedy token of each of the
 * m sequences into tokens[m]. head: the LM head's GGUF matrix (head_rows x hidden, a type
 * fleet_gguf_matmul_q8 takes), whose first `vocab` rows are the vocabulary; logits
 * [m, head_rows] scratch (on return the logits). The product is the one the model's Python
 * makes (gguf_linear.matmul's integer kernel at decode rows) and the argmax fused_ops.argmax's,
 * so the tokens are those of the sampler on those logits. What goes is the Python between
 * them: the LM head's call chain, the sampler's argmax and the conversions, 0.2 ms of a
 * one-sequence step on the 2-vCPU EPYC, run cold after the weights' stream (docs/benchmarks.md).
 * Returns fleet_decode_model's codes, or STAGE_LM_HEAD * 16 + the product's code. */
int fleet_decode_model_argmax(const LayerWeights *layers, int64_t num_layers, const StackShape *s,
                              const ModelEnds *e, const uint8_t *head, int head_type,
                              int64_t head_rows, int64_t vocab, int64_t m,
                              const int64_t *token_ids, const int64_t *positions, float *hidden,
                              float *residual, float *normed, float *logits,
                              const int64_t *slot_mapping, const int32_t *seq_lens,
                              const int32_t *block_tables, int64_t max_blocks, int num_threads,
                              int64_t *failed_layer, int64_t *tokens)
{
    int status = fleet_decode_model(layers, num_layers, s, e, m, token_ids, positions, hidden,
                                    residual, normed, slot_mapping, seq_lens, block_tables,
                                    max_blocks, num_threads, failed_layer);
    if (status) return status;
    status = fleet_gguf_matmul_q8(normed, m, s->hidden, head, head_rows, head_type, logits,
                                  num_threads);
    if (status) return STAGE_LM_HEAD * 16 + status;
    return fleet_argmax_rows(logits, m, vocab, head_rows, tokens, num_threads);
}
