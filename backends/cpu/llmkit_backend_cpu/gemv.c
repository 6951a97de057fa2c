/* gemv: y = x @ W^T for a few rows x, W float32 or bfloat16 in its own row-major layout (no packing),
 * every product and sum in float32 (bfloat16 weights widen exactly).
 *
 * For cpu.grouped's experts at decode: an expert sees one or two tokens, so its three matrices are
 * read once per step and the time is the time to stream them. PyTorch's float32 GEMV streamed a
 * Mixtral-proportioned expert (1024 x 3584, three matrices) at ~15 GB/s on the AVX2 EPYC; this
 * kernel at ~29 GB/s, the machine's copy bandwidth (two experts, one token, 2 threads, a ctypes
 * loop, medians of 20: 3.0 against 5.7 ms; bfloat16 2.3 against 2.7 ms).
 *
 * Rows of W in blocks of 4 (OpenMP over blocks): four row streams, each with a software prefetch
 * 512 bytes ahead, one FMA per 8 channels and row into four accumulators, one horizontal sum per
 * row at the end; the rows of x reuse the block from cache. A last block of fewer rows and a tail of
 * K % 8 channels run a scalar loop.
 *
 * Built by llmkit_backend_cpu/kernels.py with the other kernels (-O3 -mavx2 -mfma -fopenmp).
 */
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH_BYTES 512

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* Weights k..k+7 (or k) of a row as float32: float32 loaded, or bfloat16 widened exactly (its
 * bits are float32's upper half). `bf16` is a constant in each caller, so each inlined copy keeps
 * one branch. */
static inline __m256 load8(const void *row, int64_t k, int bf16) {
  if (!bf16) return _mm256_loadu_ps((const float *)row + k);
  const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float load1(const void *row, int64_t k, int bf16) {
  if (!bf16) return ((const float *)row)[k];
  union { uint32_t u; float f; } v = {(uint32_t)((const uint16_t *)row)[k] << 16};
  return v.f;
}

static inline __attribute__((always_inline)) void gemv(const float *x, int64_t M, int64_t K, const char *w,
                                                        int64_t N, float *y, int bf16) {
  const int64_t K8 = K & ~(int64_t)7, blocks = (N + 3) / 4, row_bytes = K * (bf16 ? 2 : 4);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n = 4 * b;
    if (n + 4 > N) { /* the last rows, one at a time */
      for (int64_t i = n; i < N; ++i)
        for (int64_t r = 0; r < M; ++r) {
          float s = 0.f;
          for (int64_t k = 0; k < K; ++k) s += load1(w + i * row_bytes, k, bf16) * x[r * K + k];
          y[r * N + i] = s;
        }
      continue;
    }
    const char *w0 = w + n * row_bytes, *w1 = w0 + row_bytes, *w2 = w1 + row_bytes, *w3 = w2 + row_bytes;
    const int64_t step = 8 * (bf16 ? 2 : 4);
    for (int64_t r = 0; r < M; ++r) {
      const float *xr = x + r * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (int64_t k = 0, at = 0; k < K8; k += 8, at += step) {
        _mm_prefetch(w0 + at + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch(w1 + at + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch(w2 + at + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch(w3 + at + PREFETCH_BYTES, _MM_HINT_T0);
        const __m256 xv = _mm256_loadu_ps(xr + k);
        a0 = _mm256_fmadd_ps(load8(w0, k, bf16), xv, a0);
        a1 = _mm256_fmadd_ps(load8(w1, k, bf16), xv, a1);
        a2 = _mm256_fmadd_ps(load8(w2, k, bf16), xv, a2);
        a3 = _mm256_fmadd_ps(load8(w3, k, bf16), xv, a3);
      }
      float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
      for (int64_t k = K8; k < K; ++k) {
        s0 += load1(w0, k, bf16) * xr[k];
        s1 += load1(w1, k, bf16) * xr[k];
        s2 += load1(w2, k, bf16) * xr[k];
        s3 += load1(w3, k, bf16) * xr[k];
      }
      float *yr = y + r * N + n;
      yr[0] = s0, yr[1] = s1, yr[2] = s2, yr[3] = s3;
    }
  }
}

/* y [M, N] float32 = x [M, K] float32 @ W^T, W [N, K] row-major float32 / bfloat16 bit patterns. */
void llmkit_gemv_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y) {
  gemv(x, M, K, (const char *)w, N, y, 0);
}

void llmkit_gemv_bf16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y) {
  gemv(x, M, K, (const char *)w, N, y, 1);
}
