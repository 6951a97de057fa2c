/* gemv: y = x @ W^T for a few rows x, W float32 or bfloat16 in its own row-major layout (no packing),
 * every product and sum in float32 (bfloat16 weights widen exactly).
 *
 * For cpu.grouped's experts at decode: an expert sees one or two tokens, so its three matrices are
 * read once per step and the time is the time to stream them.
 *
 * OpenMP over rows of W (static: each thread one contiguous range, so one sequential stream, which
 * the hardware prefetcher follows; no software prefetch). Each row is read once for each pair of
 * x's rows, 32 channels a step into 4 accumulators per row of x (8 for a pair); the pair's second
 * and later passes find the row in cache. A bfloat16 step is two 32-byte loads of 16 weights, each
 * widened as two vectors by a shift (the even channels, low halves) and a mask (the odd channels,
 * high halves), with x's channels split the same way once per call (`split`): two instructions per
 * 16 weights, where a zero-extension and a shift of each 8 took four. One horizontal sum per row of
 * W and of x at the end; channels past the last whole step run a scalar loop.
 *
 * Against the kernel before it (four rows of W interleaved, one row of x per pass, a software
 * prefetch per 8 channels and row, bfloat16 widened 8 at a time), Mixtral-proportioned experts
 * (1024 x 3584, three matrices, eight experts in turn, 2 threads, a ctypes loop, medians of 25,
 * AVX-512 EPYC, four runs; a float32 sum over the same matrices read 84 GB/s): float32 at 49-62
 * (1 row of x), 46-60 (2) and 33-39 GB/s (4) against 41-54, 37-40 and 30-32; bfloat16 at 49-64,
 * 37-45 and 23-25 against 34-39, 25-27 and 18-19. (Software prefetches slowed a plain AVX2 sum
 * there from 85 to 59 GB/s.) Not measured on an AVX2 CPU.
 *
 * Both operands in bfloat16 (`llmkit_gemv_bf16x`: a bfloat16 model's activations, which widen
 * exactly): on a CPU with AVX512_BF16, one vdpbf16ps multiplies 32 pairs of x and W and adds them
 * to 16 float32 sums (products of two bfloat16 are exact in float32; denormal inputs and outputs
 * count as zero): three instructions per 64 bytes of weights (two loads and the product) where
 * the widening above takes fourteen; elsewhere x is widened and the path above runs. Dispatched at
 * run time, as the library is built for AVX2.
 *
 * Built by llmkit_backend_cpu/kernels.py with the other kernels (-O3 -mavx2 -mfma -mf16c -fopenmp).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float load1(const void *row, int64_t k, int bf16) {
  if (!bf16) return ((const float *)row)[k];
  union { uint32_t u; float f; } v = {(uint32_t)((const uint16_t *)row)[k] << 16};
  return v.f;
}

/* Weights k..k+15 of a row as two float32 vectors: float32 k..k+7 and k+8..k+15; bfloat16 the even
 * channels (each 32-bit lane's low half, shifted up) and the odd ones (its high half, masked). */
static inline __attribute__((always_inline)) void load16(const void *row, int64_t k, int bf16, __m256 *lo,
                                                          __m256 *hi) {
  if (!bf16) {
    *lo = _mm256_loadu_ps((const float *)row + k);
    *hi = _mm256_loadu_ps((const float *)row + k + 8);
    return;
  }
  const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k));
  *lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  *hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)));
}

/* X (1 or 2, a constant in each inlined copy, so the accumulators stay in registers) rows of x
 * against one row w of W, into y[j * N]. xs: x's rows with each whole block of 16 channels in
 * load16's order; x: as given (for the tail). 32 channels a step into 4 accumulators per row of x. */
static inline __attribute__((always_inline)) void row(const float *xs, const float *x, int X, int64_t K,
                                                      const char *w, float *y, int64_t N, int bf16) {
  const int64_t steps = K / 32;
  __m256 a[2][4];
  for (int j = 0; j < X; ++j)
    for (int i = 0; i < 4; ++i) a[j][i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t k = 32 * t;
    __m256 v[4];
    load16(w, k, bf16, &v[0], &v[1]);
    load16(w, k + 16, bf16, &v[2], &v[3]);
    for (int j = 0; j < X; ++j)
      for (int i = 0; i < 4; ++i) a[j][i] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xs + j * K + k + 8 * i), a[j][i]);
  }
  for (int j = 0; j < X; ++j) {
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a[j][0], a[j][1]), _mm256_add_ps(a[j][2], a[j][3])));
    for (int64_t k = 32 * steps; k < K; ++k) s += load1(w, k, bf16) * x[j * K + k];
    y[j * N] = s;
  }
}

/* x [M, K] in load16's bfloat16 order: in each whole block of 16 channels, the 8 even ones then the
 * 8 odd ones; a last partial block as given. */
static void split(const float *x, int64_t M, int64_t K, float *out) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K; k += 16)
      for (int64_t j = 0; j < 16 && k + j < K; ++j)
        out[r * K + k + (k + 16 <= K ? (j & 1) * 8 + j / 2 : j)] = x[r * K + k + j];
}

static inline __attribute__((always_inline)) void gemv(const float *x, const float *xs, int64_t M, int64_t K,
                                                        const char *w, int64_t N, float *y, int bf16) {
  const int64_t row_bytes = K * (bf16 ? 2 : 4);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t r = 0; r < M; r += 2)
      if (M - r >= 2)
        row(xs + r * K, x + r * K, 2, K, w + i * row_bytes, y + r * N + i, N, bf16);
      else
        row(xs + r * K, x + r * K, 1, K, w + i * row_bytes, y + r * N + i, N, bf16);
}

/* The vdpbf16ps path needs a compiler that knows AVX512_BF16 (GCC 10, Clang 9); with an older one
 * the library still builds, without it. */
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define HAVE_NATIVE_BF16 1
#define NATIVE_BF16 __attribute__((target("avx512f,avx512bf16")))

/* row with bfloat16 x: 128 channels a step into 4 accumulators per row of x, then whole blocks of
 * 32, then a scalar tail. */
static inline NATIVE_BF16 __attribute__((always_inline)) void row_dp(const uint16_t *x, int X, int64_t K,
                                                                      const uint16_t *w, float *y, int64_t N) {
  __m512 a[2][4];
  for (int j = 0; j < X; ++j)
    for (int i = 0; i < 4; ++i) a[j][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 128 <= K; k += 128)
    for (int i = 0; i < 4; ++i) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * i);
      for (int j = 0; j < X; ++j)
        a[j][i] = _mm512_dpbf16_ps(a[j][i], (__m512bh)_mm512_loadu_si512(x + j * K + k + 32 * i), wv);
    }
  for (; k + 32 <= K; k += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
    for (int j = 0; j < X; ++j) a[j][0] = _mm512_dpbf16_ps(a[j][0], (__m512bh)_mm512_loadu_si512(x + j * K + k), wv);
  }
  for (int j = 0; j < X; ++j) {
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[j][0], a[j][1]), _mm512_add_ps(a[j][2], a[j][3])));
    for (int64_t t = k; t < K; ++t) s += load1(w, t, 1) * load1(x + j * K, t, 1);
    y[j * N] = s;
  }
}

static NATIVE_BF16 void gemv_dp(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t r = 0; r < M; r += 2)
      if (M - r >= 2)
        row_dp(x + r * K, 2, K, w + i * K, y + r * N + i, N);
      else
        row_dp(x + r * K, 1, K, w + i * K, y + r * N + i, N);
}

#endif

static int native_bf16 = -1; /* whether llmkit_gemv_bf16x uses vdpbf16ps; -1: not yet asked */

/* Turns the vdpbf16ps path on (where the CPU has it and the compiler built it) or off; returns
 * whether it is on. For tests of the other path on a CPU that has it. */
int llmkit_gemv_native_bf16(int on) {
#ifdef HAVE_NATIVE_BF16
  native_bf16 = on && __builtin_cpu_supports("avx512bf16");
#else
  (void)on;
  native_bf16 = 0;
#endif
  return native_bf16;
}

/* y [M, N] float32 = x [M, K] float32 @ W^T, W [N, K] row-major float32 / bfloat16 bit patterns.
 * 0 on success; the bfloat16 one returns 1 if it cannot allocate x's split copy (M * K floats). */
int llmkit_gemv_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y) {
  gemv(x, x, M, K, (const char *)w, N, y, 0);
  return 0;
}

int llmkit_gemv_bf16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y) {
  float *xs = (float *)malloc(sizeof(float) * (size_t)(M * K > 0 ? M * K : 1));
  if (!xs) return 1;
  split(x, M, K, xs);
  gemv(x, xs, M, K, (const char *)w, N, y, 1);
  free(xs);
  return 0;
}

/* y [M, N] float32 = x [M, K] @ W^T, x and W [N, K] both bfloat16 bit patterns. 0 on success, 1 if
 * x's float32 copy (without AVX512_BF16) cannot be allocated. */
int llmkit_gemv_bf16x(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y) {
  if (native_bf16 < 0) llmkit_gemv_native_bf16(1);
#ifdef HAVE_NATIVE_BF16
  if (native_bf16) {
    gemv_dp(x, M, K, w, N, y);
    return 0;
  }
#endif
  float *wide = (float *)malloc(sizeof(float) * (size_t)(M * K > 0 ? M * K : 1));
  if (!wide) return 1;
  for (int64_t t = 0; t < M * K; ++t) wide[t] = load1(x, t, 1);
  const int failed = llmkit_gemv_bf16(wide, M, K, w, N, y);
  free(wide);
  return failed;
}
