/* Portable fp32 vectors (GCC/Clang vector extensions): one source builds for AVX2, AVX-512,
 * NEON or plain SSE, as -march allows. 8-lane vectors (f32x8) for every kernel, and vectors
 * as wide as the CPU's (fvec, VLEN lanes) for paged attention (online_softmax.h). */
#ifndef FLEETLM_VECTOR_H
#define FLEETLM_VECTOR_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* for (int64_t VAR = 0; VAR < N; VAR++) { BODY } split statically over THREADS OpenMP threads,
 * or run by the caller alone where one thread is all it gets. A region of one thread, or one
 * whose `if` is false, still goes through libgomp: 1.0-1.2 us a call on the 2-vCPU EPYC, where
 * a decode row's norm takes 0.1 us, and a one-sequence decode step made about ten such calls
 * a layer (docs/benchmarks.md, "Regions of one thread"). */
#define PARALLEL_FOR(THREADS, VAR, N, ...)                                                    \
    do {                                                                                      \
        const int threads_ = (THREADS);                                                       \
        const int64_t count_ = (N);                                                           \
        if (threads_ <= 1) {                                                                  \
            for (int64_t VAR = 0; VAR < count_; VAR++) { __VA_ARGS__ }                        \
        } else {                                                                              \
            _Pragma("omp parallel for schedule(static) num_threads(threads_)")                \
            for (int64_t VAR = 0; VAR < count_; VAR++) { __VA_ARGS__ }                        \
        }                                                                                     \
    } while (0)

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef int8_t i8x8 __attribute__((vector_size(8)));

static ALWAYS_INLINE f32x8 load8(const float *p)
{
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static ALWAYS_INLINE void store8(float *p, f32x8 v) { memcpy(p, &v, sizeof v); }

static ALWAYS_INLINE f32x8 splat8(float x) { return (f32x8){x, x, x, x, x, x, x, x}; }

/* Lane-wise mask ? a : b, for a mask from a vector comparison (all ones or all zeros); and a
 * load of bf16 values (bf16 is the top half of an fp32). Defined once for each vector width:
 * F, I, U, H the float, int32, uint32 and uint16 vector types of its lanes, WIDEN its
 * uint16 -> uint32 conversion. */
#define DEFINE_SELECT_AND_LOAD_BF16(SELECT, LOAD_BF16, F, I, U, H, WIDEN)                   \
    static ALWAYS_INLINE F SELECT(I mask, F a, F b)                                         \
    {                                                                                       \
        return (F)(((I)a & mask) | ((I)b & ~mask));                                         \
    }                                                                                       \
    static ALWAYS_INLINE F LOAD_BF16(const uint16_t *p)                                     \
    {                                                                                       \
        H h;                                                                                \
        memcpy(&h, p, sizeof h);                                                            \
        return (F)(WIDEN(h) << 16);                                                         \
    }

static ALWAYS_INLINE u32x8 widen8(u16x8 h) { return __builtin_convertvector(h, u32x8); }
DEFINE_SELECT_AND_LOAD_BF16(select8, load8_bf16, f32x8, i32x8, u32x8, u16x8, widen8)

/* GCC 12 scalarizes the generic int8 -> fp32 conversion, so AVX2 gets its two instructions. */
static ALWAYS_INLINE f32x8 load8_i8(const int8_t *p)
{
#ifdef __AVX2__
    __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    f32x8 out;
    memcpy(&out, &v, sizeof out);
    return out;
#else
    i8x8 h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, f32x8);
#endif
}

/* a * b + c with one rounding where the CPU has FMA. Spelled out because whether GCC fuses
 * `c += a * b` depends on the code around it, and kernels that promise one sum order for
 * every batch size need the same arithmetic at every call site. */
static ALWAYS_INLINE f32x8 fma8(f32x8 a, f32x8 b, f32x8 c)
{
#if defined(__FMA__) && defined(__AVX2__)
    __m256 r = _mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
    f32x8 out;
    memcpy(&out, &r, sizeof out);
    return out;
#else
    return a * b + c;
#endif
}

/* Halves are taken with shuffles, not memcpy: a vector whose bytes are copied is kept in
 * memory, and the loop that sums into it then stores and reloads it on every step. */
static ALWAYS_INLINE float hsum8(f32x8 a)
{
    f32x4 s = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* The largest lane of a vector without NaNs, by shuffles as hsum8 adds. */
static ALWAYS_INLINE float hmax8(f32x8 a)
{
    f32x8 b = __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3);
    a = select8(a > b, a, b);
    b = __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5);
    a = select8(a > b, a, b);
    b = __builtin_shufflevector(a, a, 1, 0, 3, 2, 5, 4, 7, 6);
    return a[0] > b[0] ? a[0] : b[0];
}

/* One float as bf16, rounded to nearest even as torch rounds; a NaN stays a (quiet) NaN. */
static ALWAYS_INLINE uint16_t to_bf16(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* Stores a float vector as bf16, rounded to nearest even as torch rounds; a NaN stays a
 * (quiet) NaN. F, U, I, H: the float, uint32, int32 and uint16 vector types of its lanes. */
#define DEFINE_STORE_BF16(NAME, F, U, I, H)                                                  \
    static ALWAYS_INLINE void NAME(uint16_t *p, F v)                                        \
    {                                                                                       \
        const U bits = (U)v;                                                                \
        const U rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;                     \
        const I is_nan = (I)((bits & 0x7fffffffu) > 0x7f800000u);                           \
        const U half = (U)(((I)((bits >> 16) | 0x40u) & is_nan) | ((I)rounded & ~is_nan));  \
        const H h = __builtin_convertvector(half, H);                                       \
        memcpy(p, &h, sizeof h);                                                            \
    }

DEFINE_STORE_BF16(store8_bf16, f32x8, u32x8, i32x8, u16x8)

/* ---- Vectors as wide as the CPU's: VLEN lanes (16 with AVX-512, else 8) -------------------
 * For loops over whole rows whose length is a multiple of 16 (paged attention's head_dim). */
#ifdef __AVX512F__
#define VLEN 16
#else
#define VLEN 8
#endif
typedef float fvec __attribute__((vector_size(VLEN * 4)));
typedef int32_t ivec __attribute__((vector_size(VLEN * 4)));
typedef uint32_t uvec __attribute__((vector_size(VLEN * 4)));
typedef uint16_t hvec __attribute__((vector_size(VLEN * 2)));

static ALWAYS_INLINE fvec loadv(const float *p)
{
    fvec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static ALWAYS_INLINE void storev(float *p, fvec v) { memcpy(p, &v, sizeof v); }

static ALWAYS_INLINE fvec splatv(float x)
{
#if VLEN == 16
    __m512 v = _mm512_set1_ps(x);
    fvec out;
    memcpy(&out, &v, sizeof out);
    return out;
#else
    return splat8(x);
#endif
}

#if VLEN == 16
/* GCC 12 widens 16 lanes in two halves and joins them; AVX-512 has one instruction for it. */
static ALWAYS_INLINE uvec widenv(hvec h) { return (uvec)_mm512_cvtepu16_epi32((__m256i)h); }
#else
static ALWAYS_INLINE uvec widenv(hvec h) { return __builtin_convertvector(h, uvec); }
#endif
DEFINE_SELECT_AND_LOAD_BF16(selectv, loadv_bf16, fvec, ivec, uvec, hvec, widenv)

static ALWAYS_INLINE fvec loadv_i8(const int8_t *p)
{
#if VLEN == 16
    __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    fvec out;
    memcpy(&out, &v, sizeof out);
    return out;
#else
    f32x8 v = load8_i8(p);
    fvec out;
    memcpy(&out, &v, sizeof out);
    return out;
#endif
}

static ALWAYS_INLINE float hmaxv(fvec a)
{
#if VLEN == 16
    f32x8 lo = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7);
    f32x8 hi = __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    return hmax8(select8(lo > hi, lo, hi));
#else
    return hmax8(a);
#endif
}

static ALWAYS_INLINE float hsumv(fvec a)
{
#if VLEN == 16
    return hsum8(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15));
#else
    return hsum8(a);
#endif
}

/* ---- VLEN vectors of partial sums folded into one vector of their sums ----------------------
 * fold_sums(v)[i] is hsumv(v[FOLD_ORDER[i]]), the same float, for half the shuffles and a
 * quarter of the adds of VLEN horizontal sums: pairs of vectors are folded with lane i added to
 * lane i + w in each block of 2w lanes (w = VLEN/2, ..., 1), hsumv's order. */
#define FOLD_LO(i, w) ((i) % (2 * (w)) < (w) ? (i) : VLEN + (i) - (w))
#define FOLD_HI(i, w) ((i) % (2 * (w)) < (w) ? (i) + (w) : VLEN + (i))
#if VLEN == 16
#define FOLD_LANES(F, w)                                                                    \
    F(0, w), F(1, w), F(2, w), F(3, w), F(4, w), F(5, w), F(6, w), F(7, w), F(8, w), F(9, w), \
        F(10, w), F(11, w), F(12, w), F(13, w), F(14, w), F(15, w)
static const int FOLD_ORDER[VLEN] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
#else
#define FOLD_LANES(F, w) F(0, w), F(1, w), F(2, w), F(3, w), F(4, w), F(5, w), F(6, w), F(7, w)
static const int FOLD_ORDER[VLEN] = {0, 4, 2, 6, 1, 5, 3, 7};
#endif
#define FOLD_PAIR(x, y, w)                                                                  \
    (__builtin_shufflevector(x, y, FOLD_LANES(FOLD_LO, w)) +                                \
     __builtin_shufflevector(x, y, FOLD_LANES(FOLD_HI, w)))

static ALWAYS_INLINE fvec fold_sums(fvec v[VLEN])
{
#if VLEN == 16
    for (int i = 0; i < 8; i++) v[i] = FOLD_PAIR(v[2 * i], v[2 * i + 1], 8);
#endif
    for (int i = 0; i < 4; i++) v[i] = FOLD_PAIR(v[2 * i], v[2 * i + 1], 4);
    for (int i = 0; i < 2; i++) v[i] = FOLD_PAIR(v[2 * i], v[2 * i + 1], 2);
    return FOLD_PAIR(v[0], v[1], 1);
}

/* exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); inputs below -87 give ~1e-38. */
static ALWAYS_INLINE fvec expv(fvec x)
{
    const fvec zero = {0}, round_magic = zero + 12582912.0f; /* 1.5 * 2^23 */
    x = selectv(x < -87.0f, zero - 87.0f, x);
    fvec n = (x * 1.44269504088896341f + round_magic) - round_magic;
    fvec r = x - n * 0.693359375f + n * 2.12194440e-4f;
    fvec p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    return p * (fvec)bits;
}
DEFINE_STORE_BF16(storev_bf16, fvec, uvec, ivec, hvec)

#endif
