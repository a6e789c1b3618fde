/* Portable 8-lane fp32 vectors (GCC/Clang vector extensions): one source builds for AVX2,
 * AVX-512, NEON or plain SSE, as -march allows. Used by online_softmax.h. */
#ifndef FLEETLM_VECTOR_H
#define FLEETLM_VECTOR_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

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

/* Lane-wise mask ? a : b, for a mask from a vector comparison (all ones or all zeros). */
static ALWAYS_INLINE f32x8 select8(i32x8 mask, f32x8 a, f32x8 b)
{
    return (f32x8)(((i32x8)a & mask) | ((i32x8)b & ~mask));
}

/* bf16 is the top half of an fp32. */
static ALWAYS_INLINE f32x8 load8_bf16(const uint16_t *p)
{
    u16x8 h;
    memcpy(&h, p, sizeof h);
    return (f32x8)(__builtin_convertvector(h, u32x8) << 16);
}

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

static ALWAYS_INLINE float hsum8(f32x8 a)
{
    f32x4 lo, hi;
    memcpy(&lo, &a, sizeof lo);
    memcpy(&hi, (const char *)&a + sizeof lo, sizeof hi);
    f32x4 s = lo + hi;
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); inputs below -87 give ~1e-38. */
static ALWAYS_INLINE f32x8 exp8(f32x8 x)
{
    const f32x8 round_magic = splat8(12582912.0f); /* 1.5 * 2^23: adds round to integer */
    x = select8(x < -87.0f, splat8(-87.0f), x);
    f32x8 n = (x * 1.44269504088896341f + round_magic) - round_magic;
    f32x8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    f32x8 p = splat8(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    i32x8 bits = (__builtin_convertvector(n, i32x8) + 127) << 23;
    return p * (f32x8)bits;
}

#endif
