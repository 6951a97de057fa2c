/* The row kernels of gemv.c and moe.c: dot products of a few rows of x with rows of W, W float32
 * or bfloat16 in its own row-major layout (no packing), every product and sum in float32
 * (bfloat16 widens exactly). How they read and what they measured: gemv.c. */
#ifndef LLMKIT_GEMV_H
#define LLMKIT_GEMV_H

#include <immintrin.h>
#include <stdint.h>

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

/* f rounded to the nearest bfloat16, ties to even (NaN stays a quiet NaN). */
static inline uint16_t to_bf16(float f) {
  union { float f; uint32_t u; } v = {f};
  if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((v.u >> 16) | 0x40);
  return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1)) >> 16);
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

/* How far ahead of its loads a product of two or more rows of x prefetches W (gemv.c). */
#define PREFETCH_BYTES 4096

/* X (1 or 2, a constant in each inlined copy, so the accumulators stay in registers) rows of x
 * against one row w of W, into y[j * N]. xs: x's rows with each whole block of 16 channels in
 * load16's order (`split`; x itself for float32 W); x: as given (for the tail). 32 channels a step
 * into 4 accumulators per row of x; with two rows, a prefetch of each line PREFETCH_BYTES ahead. */
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
    if (X > 1) {
      _mm_prefetch(w + k * (bf16 ? 2 : 4) + PREFETCH_BYTES, _MM_HINT_T0);
      if (!bf16) _mm_prefetch(w + k * 4 + 64 + PREFETCH_BYTES, _MM_HINT_T0);
    }
    for (int j = 0; j < X; ++j)
      for (int i = 0; i < 4; ++i) a[j][i] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xs + j * K + k + 8 * i), a[j][i]);
  }
  for (int j = 0; j < X; ++j) {
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a[j][0], a[j][1]), _mm256_add_ps(a[j][2], a[j][3])));
    for (int64_t k = 32 * steps; k < K; ++k) s += load1(w, k, bf16) * x[j * K + k];
    y[j * N] = s;
  }
}

/* Channels [lo, hi) of a row x of K channels into out in load16's bfloat16 order: in each whole
 * block of 16 channels, the 8 even ones then the 8 odd ones; a last partial block as given. lo is
 * a multiple of 16, and hi too unless it is K. */
static inline void split(const float *x, int64_t K, int64_t lo, int64_t hi, float *out) {
  for (int64_t k = lo; k < hi; k += 16)
    for (int64_t j = 0; j < 16 && k + j < hi; ++j) out[k + (k + 16 <= K ? (j & 1) * 8 + j / 2 : j)] = x[k + j];
}

/* Rows [lo, hi) of W [N, K] against X rows of x (pairs, then a single one): y[j * ldy + i]. The
 * driver of gemv.c's and moe.c's float32-x products; bf16 a constant in each inlined copy. */
static inline __attribute__((always_inline)) void rows(const float *x, const float *xs, int64_t X, int64_t K,
                                                       const void *w, int64_t lo, int64_t hi, float *y, int64_t ldy,
                                                       int bf16) {
  const int64_t row_bytes = K * (bf16 ? 2 : 4);
  for (int64_t i = lo; i < hi; ++i)
    for (int64_t r = 0; r < X; r += 2)
      if (X - r >= 2)
        row(xs + r * K, x + r * K, 2, K, (const char *)w + i * row_bytes, y + r * ldy + i, ldy, bf16);
      else
        row(xs + r * K, x + r * K, 1, K, (const char *)w + i * row_bytes, y + r * ldy + i, ldy, bf16);
}

/* [*lo, *hi): thread t of T's share of n items, in whole blocks of `align` items (the last thread
 * takes the rest), so that each thread reads one contiguous range of a matrix's rows. */
static inline void share(int64_t n, int64_t align, int t, int T, int64_t *lo, int64_t *hi) {
  const int64_t blocks = (n + align - 1) / align, a = blocks * t / T * align, b = blocks * (t + 1) / T * align;
  *lo = a < n ? a : n;
  *hi = t == T - 1 || b > n ? n : b;
}

/* The AVX-512 paths (vdpbf16ps; float32 in groups of 4 rows) need a compiler that knows AVX512_BF16
 * (GCC 10, Clang 9); with an older one the library still builds, without them. */
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define HAVE_AVX512 1
#define NATIVE_BF16 __attribute__((target("avx512f,avx512bf16")))
#define AVX512F __attribute__((target("avx512f")))

/* row with bfloat16 x and X = 1..4 rows of it in one pass (AVX-512 has the registers for 16
 * accumulators): 128 channels a step into 4 accumulators per row of x (with two or more rows, a
 * prefetch of each line PREFETCH_BYTES ahead), then whole blocks of 32, then a scalar tail. */
static inline NATIVE_BF16 __attribute__((always_inline)) void row_dp(const uint16_t *x, int X, int64_t K,
                                                                      const uint16_t *w, float *y, int64_t N) {
  __m512 a[4][4];
  for (int j = 0; j < X; ++j)
    for (int i = 0; i < 4; ++i) a[j][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 128 <= K; k += 128)
    for (int i = 0; i < 4; ++i) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * i);
      if (X > 1) _mm_prefetch((const char *)(w + k + 32 * i) + PREFETCH_BYTES, _MM_HINT_T0);
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

/* row_dp for 4 consecutive rows w of W at once, X = 1..4 rows of x: 64 channels of x a step held
 * in registers (8 at 4 rows) for the 4 rows' 16 accumulators, so each 64 bytes of W take one load of W and
 * one of x where row_dp takes one and X; prefetched one 4-row group ahead, in the group's memory
 * order. Then a step of 32 channels, then a scalar tail. gemv.c: why and what it measured. */
static inline NATIVE_BF16 __attribute__((always_inline)) void rows4_dp(const uint16_t *x, int X, int64_t K,
                                                                        const uint16_t *w, float *y, int64_t N) {
  __m512 a[4][4];
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < X; ++j) a[r][j] = _mm512_setzero_ps();
  const char *next = (const char *)(w + 4 * K);
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    __m512bh xv[4][2];
    for (int j = 0; j < X; ++j)
      for (int c = 0; c < 2; ++c) xv[j][c] = (__m512bh)_mm512_loadu_si512(x + j * K + k + 32 * c);
    for (int r = 0; r < 4; ++r) {
      /* the group reads 4 x 128 bytes a step; the same 512 bytes, in order, of the next group */
      _mm_prefetch(next + 8 * k + 128 * r, _MM_HINT_T0);
      _mm_prefetch(next + 8 * k + 128 * r + 64, _MM_HINT_T0);
      for (int c = 0; c < 2; ++c) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k + 32 * c);
        for (int j = 0; j < X; ++j) a[r][j] = _mm512_dpbf16_ps(a[r][j], xv[j][c], wv);
      }
    }
  }
  if (k + 32 <= K) {
    for (int r = 0; r < 4; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      for (int j = 0; j < X; ++j) a[r][j] = _mm512_dpbf16_ps(a[r][j], (__m512bh)_mm512_loadu_si512(x + j * K + k), wv);
    }
    k += 32;
  }
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < X; ++j) {
      float s = _mm512_reduce_add_ps(a[r][j]);
      for (int64_t t = k; t < K; ++t) s += load1(w + r * K, t, 1) * load1(x + j * K, t, 1);
      y[j * N + r] = s;
    }
}

/* rows4_dp's float32 form (AVX-512F): 4 rows of W against X = 1..4 rows of x, 32 channels of x a
 * step in registers, the next group prefetched in its memory order; then a step of 16 channels,
 * then a scalar tail. */
static inline AVX512F __attribute__((always_inline)) void rows4_f32(const float *x, int X, int64_t K, const float *w,
                                                                     float *y, int64_t N) {
  __m512 a[4][4];
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < X; ++j) a[r][j] = _mm512_setzero_ps();
  const char *next = (const char *)(w + 4 * K);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512 xv[4][2];
    for (int j = 0; j < X; ++j)
      for (int c = 0; c < 2; ++c) xv[j][c] = _mm512_loadu_ps(x + j * K + k + 16 * c);
    for (int r = 0; r < 4; ++r) {
      _mm_prefetch(next + 16 * k + 128 * r, _MM_HINT_T0);
      _mm_prefetch(next + 16 * k + 128 * r + 64, _MM_HINT_T0);
      for (int c = 0; c < 2; ++c) {
        const __m512 wv = _mm512_loadu_ps(w + r * K + k + 16 * c);
        for (int j = 0; j < X; ++j) a[r][j] = _mm512_fmadd_ps(xv[j][c], wv, a[r][j]);
      }
    }
  }
  if (k + 16 <= K) {
    for (int r = 0; r < 4; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * K + k);
      for (int j = 0; j < X; ++j) a[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + j * K + k), wv, a[r][j]);
    }
    k += 16;
  }
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < X; ++j) {
      float s = _mm512_reduce_add_ps(a[r][j]);
      for (int64_t t = k; t < K; ++t) s += w[r * K + t] * x[j * K + t];
      y[j * N + r] = s;
    }
}

/* rows with bfloat16 x and W (defined in gemv.c). */
NATIVE_BF16 void llmkit_rows_dp(const uint16_t *x, int64_t X, int64_t K, const uint16_t *w, int64_t lo, int64_t hi,
                                float *y, int64_t ldy);
#endif

/* Whether bfloat16 x times bfloat16 W takes the vdpbf16ps path (the CPU has AVX512_BF16, the
 * compiler built it, and tests have not turned it off); gemv.c. */
int llmkit_native_bf16(void);

/* rows with float32 x and W: with 4 or more rows of x on a CPU with AVX-512F, groups of 4 rows of W
 * (rows4_f32), the rest as rows does (gemv.c). */
void llmkit_rows_f32(const float *x, int64_t X, int64_t K, const float *w, int64_t lo, int64_t hi, float *y,
                     int64_t ldy);

#endif
