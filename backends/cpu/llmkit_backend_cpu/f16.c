/* fp16: half-precision weights times float32 activations, y = x @ W^T with every product and sum in
 * float32 (each weight converted exactly from half; the one rounding is the weight's, at packing).
 *
 * Decode multiplies one (or a few) rows by each weight matrix once, so it is bound by how fast the
 * weights stream from memory: half precision reads half of float32's bytes. fbgemm's fp16 GEMM
 * (`quantized::linear_dynamic_fp16`), which this kernel replaced, streamed SmolLM2's 121 decode
 * linears (269 MB) at ~15 GB/s; this one at ~25 GB/s (AVX2 EPYC, 2 threads; README).
 *
 * Layout: rows in tiles of 8 (N padded to a multiple of 8 by the packer), w[t][k][r] = W[8t + r, k]:
 * one 16-byte load holds input channel k of the tile's 8 rows, which F16C converts to 8 floats and
 * one FMA multiplies by the broadcast x[k]. Four accumulators (channels k mod 4) cover the FMA's
 * latency; the sum of the four is the tile's 8 outputs. A tile is read once per call from memory
 * (the rows of x reuse it from L1: K * 16 bytes, 24 KiB at K = 1536), with a software prefetch
 * 2 KiB ahead: without it the same 121 linears took 12.2 instead of 10.6 ms (medians of 12).
 *
 * Built by llmkit_backend_cpu/kernels.py (-O3 -mavx2 -mfma -mf16c -fopenmp); tiles are split over
 * OpenMP threads, in PyTorch's libgomp pool.
 */
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH_BYTES 2048

/* y [M, 8 * N8] = x [M, K] @ W^T for w [N8, K, 8] half-precision bit patterns. */
void llmkit_f16_linear(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N8, float *y) {
  const int64_t N = 8 * N8, K4 = K & ~(int64_t)3;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N8; ++t) {
    const uint16_t *wt = w + t * K * 8;
    for (int64_t r = 0; r < M; ++r) {
      const float *xr = x + r * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (int64_t k = 0; k < K4; k += 4) {
        _mm_prefetch((const char *)(wt + 8 * k) + PREFETCH_BYTES, _MM_HINT_T0);
        const __m256i c01 = _mm256_loadu_si256((const __m256i *)(wt + 8 * k));
        const __m256i c23 = _mm256_loadu_si256((const __m256i *)(wt + 8 * k + 16));
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(c01)), _mm256_broadcast_ss(xr + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(c01, 1)), _mm256_broadcast_ss(xr + k + 1), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(c23)), _mm256_broadcast_ss(xr + k + 2), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(c23, 1)), _mm256_broadcast_ss(xr + k + 3), a3);
      }
      for (int64_t k = K4; k < K; ++k)
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wt + 8 * k))), _mm256_broadcast_ss(xr + k),
                             a0);
      _mm256_storeu_ps(y + r * N + 8 * t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
  }
}
