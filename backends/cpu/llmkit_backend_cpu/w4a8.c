/* w4a8: int4 weights x int8 activations, the scheme of llama.cpp's Q4_1 x Q8_1 dot product.
 *
 * Weights W [N, K], per row and group g of 32 input channels: w ~ d[n, g] * q + m[n, g], q in
 * [0, 15], stored two per byte: byte j of a group holds q_j (low nibble) and q_{j+16} (high).
 * Activations x [M, K], per row and block b of 32 channels: x ~ e[r, b] * p, p = round(x / e)
 * in [-127, 127], e = max|x_block| / 127 (quantised here, at every call).
 * Then y[r, n] = sum_g d e (sum_i q_i p_i) + m e (sum_i p_i): the inner sums are exact integer
 * dot products (AVX2 maddubs: unsigned q times signed p, pairs added in int16, then int32),
 * the outer sum runs in float32.
 *
 * Built by llmkit_backend_cpu/w4a8.py with the C compiler at first use, -O3 -mavx2 -mfma
 * -fopenmp. Rows of W are split over OpenMP threads; linked against libgomp.so.1, the runtime
 * PyTorch has already loaded, so both share one thread pool.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 32

/* x [M, K] float32 -> p [M, K] int8, e [M, K/32] scale, s [M, K/32] = e * sum(p). */
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *p, float *e, float *s) {
  const int64_t G = K / GROUP;
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t b = 0; b < G; ++b) {
      const float *in = x + r * K + b * GROUP;
      int8_t *out = p + r * K + b * GROUP;
      float amax = 0.f;
      for (int i = 0; i < GROUP; ++i) amax = fmaxf(amax, fabsf(in[i]));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int sum = 0;
      for (int i = 0; i < GROUP; ++i) {
        const int q = (int)nearbyintf(in[i] * inv);
        out[i] = (int8_t)q;
        sum += q;
      }
      e[r * G + b] = scale;
      s[r * G + b] = scale * (float)sum;
    }
  }
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* The 32 products q_i p_i of one group as 8 float32 partial sums (exact: integers below 2^24). */
static inline __m256 group_dot(const uint8_t *w, const int8_t *p) {
  const __m128i bytes = _mm_loadu_si128((const __m128i *)w), nibble = _mm_set1_epi8(0x0F);
  const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble),
                                     _mm_and_si128(bytes, nibble));
  const __m256i a = _mm256_loadu_si256((const __m256i *)p);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, a), _mm256_set1_epi16(1)));
}

/* y [M, N] = x [M, K] @ W^T. Returns 0, or -1 if the int8 copy of x could not be allocated. */
int llmkit_w4a8_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *d,
                       const float *m, int64_t N, float *y) {
  const int64_t G = K / GROUP;
  int8_t *p = malloc((size_t)(M * K));
  float *e = malloc(2 * sizeof(float) * (size_t)(M * G));
  if (p == NULL || e == NULL) {
    free(p);
    free(e);
    return -1;
  }
  float *s = e + M * G;
  quantize_rows(x, M, K, p, e, s);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t *wn = w + n * (K / 2);
    const float *dn = d + n * G, *mn = m + n * G;
    for (int64_t r = 0; r < M; ++r) {
      const int8_t *pr = p + r * K;
      const float *er = e + r * G, *sr = s + r * G;
      /* two accumulators, groups alternating between them: with one, every FMA would wait for
       * the previous one (5-8% slower over SmolLM2's decode linears, two runs) */
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      float off0 = 0.f, off1 = 0.f;
      int64_t g = 0;
      for (; g + 1 < G; g += 2) {
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(dn[g] * er[g]), group_dot(wn + g * 16, pr + g * GROUP), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(dn[g + 1] * er[g + 1]),
                               group_dot(wn + g * 16 + 16, pr + g * GROUP + GROUP), acc1);
        off0 += mn[g] * sr[g];
        off1 += mn[g + 1] * sr[g + 1];
      }
      if (g < G) {
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(dn[g] * er[g]), group_dot(wn + g * 16, pr + g * GROUP), acc0);
        off0 += mn[g] * sr[g];
      }
      y[r * N + n] = hsum(_mm256_add_ps(acc0, acc1)) + (off0 + off1);
    }
  }
  free(p);
  free(e);
  return 0;
}
