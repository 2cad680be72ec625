/* The int8 Linear layer of `gpt sample --quantize int8`: y = x W^T + b, W stored in int8.
 *
 * Decoding a token reads every weight once, so it runs at the speed of memory: int8 weights
 * are a quarter of float32's bytes and half of bfloat16's. Turning each int8 weight back into
 * a float costs more instructions than the load itself, which keeps a weight-only kernel
 * compute-bound on two cores. So the activations are quantized too, one scale per row (per
 * token), and the products are summed in integers by the CPU's VNNI dot-product instruction,
 * 64 (or 32) byte pairs at a time; llama.cpp's Q8_0 does the same per block of 32.
 *
 * Built by gpt/quant.py with the host's C compiler (-march=native) and called through ctypes.
 *
 * Layout: x (M, K) and y (M, N) in float32 or bfloat16 (`bf16`); w (N, Kp) int8, each row
 * zero-padded to Kp, a multiple of 64; w_scale (N,) so that W = w * w_scale; w_sum (N,) each
 * row's sum; bias (N,) float32 or NULL; qx (M, Kp) and x_scale (M,) are scratch space.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
typedef __m512i vec;
#define VEC_BYTES 64
static inline vec vec_zero(void) { return _mm512_setzero_si512(); }
static inline vec vec_load(const void *p) { return _mm512_loadu_si512(p); }
/* acc += the sums of four products of unsigned bytes u with signed bytes s, per 32-bit lane */
static inline vec vec_dot(vec acc, vec u, vec s) { return _mm512_dpbusd_epi32(acc, u, s); }
static inline int32_t vec_sum(vec v) { return _mm512_reduce_add_epi32(v); }
/* the lane sums of a, b, c, d as one vector: their halves added pairwise, interleaved, until
 * one 128-bit lane holds all four; a quarter of the work of four separate sums */
static inline __m128i vec_sum4(vec a, vec b, vec c, vec d) {
    __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd),
                                    _mm512_extracti64x4_epi64(abcd, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}
#elif defined(__AVXVNNI__)
typedef __m256i vec;
#define VEC_BYTES 32
static inline vec vec_zero(void) { return _mm256_setzero_si256(); }
static inline vec vec_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vec vec_dot(vec acc, vec u, vec s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
static inline int32_t vec_sum(vec v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}
static inline __m128i vec_sum4(vec a, vec b, vec c, vec d) {
    __m256i ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
    __m256i cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
    __m256i abcd = _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}
#else
#error "the int8 kernel needs AVX512-VNNI or AVX-VNNI"
#endif

#define ROWS 4 /* weight rows per pass over an activation row: its bytes are loaded once */

int int8_linear_vector_bytes(void) { return VEC_BYTES; }

static inline float load_x(const void *x, int bf16, int64_t i) {
    if (!bf16) return ((const float *)x)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline void store_y(void *y, int bf16, int64_t i, float v) {
    if (!bf16) {
        ((float *)y)[i] = v;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits += 0x7fff + ((bits >> 16) & 1); /* round to nearest even, as torch does */
    ((uint16_t *)y)[i] = (uint16_t)(bits >> 16);
}

/* Row `row` of x as unsigned bytes round(x / s) + 128 with s = max|x| / 127; the padding
 * holds 128, which stands for zero. Returns s. */
static float quantize_row(const void *x, int bf16, int64_t row, int64_t K, int64_t Kp,
                          uint8_t *q) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(load_x(x, bf16, row * K + k)));
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t k = 0; k < K; k++)
        q[k] = (uint8_t)(lrintf(load_x(x, bf16, row * K + k) * inv) + 128);
    memset(q + K, 128, (size_t)(Kp - K));
    return amax / 127.f;
}

/* dots[r] = sum_k q[k] * w[r][k] for `rows` (at most ROWS) consecutive weight rows */
static void dot_rows(const uint8_t *q, const int8_t *w, int64_t Kp, int rows, int32_t *dots) {
    if (rows == ROWS) {
        vec a0 = vec_zero(), a1 = vec_zero(), a2 = vec_zero(), a3 = vec_zero();
        for (int64_t k = 0; k < Kp; k += VEC_BYTES) {
            vec u = vec_load(q + k);
            a0 = vec_dot(a0, u, vec_load(w + k));
            a1 = vec_dot(a1, u, vec_load(w + Kp + k));
            a2 = vec_dot(a2, u, vec_load(w + 2 * Kp + k));
            a3 = vec_dot(a3, u, vec_load(w + 3 * Kp + k));
        }
        _mm_storeu_si128((__m128i *)dots, vec_sum4(a0, a1, a2, a3));
        return;
    }
    for (int r = 0; r < rows; r++) {
        vec a = vec_zero();
        for (int64_t k = 0; k < Kp; k += VEC_BYTES) a = vec_dot(a, vec_load(q + k), vec_load(w + r * Kp + k));
        dots[r] = vec_sum(a);
    }
}

void int8_linear(const void *x, void *y, int bf16, const int8_t *w, const float *w_scale,
                 const int32_t *w_sum, const float *bias, int64_t M, int64_t N, int64_t K,
                 int64_t Kp, uint8_t *qx, float *x_scale, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) x_scale[m] = quantize_row(x, bf16, m, K, Kp, qx + m * Kp);
        /* each thread takes blocks of ROWS weight rows and runs every activation row by them */
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += ROWS) {
            int rows = N - n0 < ROWS ? (int)(N - n0) : ROWS;
            int32_t dots[ROWS];
            for (int64_t m = 0; m < M; m++) {
                dot_rows(qx + m * Kp, w + n0 * Kp, Kp, rows, dots);
                for (int r = 0; r < rows; r++) {
                    int64_t n = n0 + r;
                    /* the +128 offset of q added 128 * w_sum[n] to the dot product */
                    float v = x_scale[m] * w_scale[n] * (float)(dots[r] - 128 * w_sum[n]);
                    store_y(y, bf16, m * N + n, bias ? v + bias[n] : v);
                }
            }
        }
    }
}
