/* gemv: y = x @ W^T for a few rows x, W float32 or bfloat16 in its own row-major layout (no packing),
 * every product and sum in float32 (bfloat16 weights widen exactly).
 *
 * For cpu.grouped's experts at decode: an expert sees one or two tokens, so its three matrices are
 * read once per step and the time is the time to stream them.
 *
 * OpenMP over rows of W (static: each thread one contiguous range, so one sequential stream, which
 * the hardware prefetcher follows; software prefetch below). Each row is read once for each pair of
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
 * Software prefetch: none for one row of x, where the hardware prefetcher alone streams W as fast
 * as a plain sum; with two or more rows the arithmetic per byte grows and the core's loads no
 * longer overlap the memory's latency, so each line is prefetched 4 KiB ahead (PREFETCH_BYTES).
 * Same setting, eight 3584 x 1024 matrices in turn, 30 turns against a float32 sum of the same
 * matrices (51-70 GB/s in those runs): float32 at 55, 53 and 53 GB/s (2, 3, 4 rows) against 50, 44
 * and 46 without; bfloat16 with float32 x at 67 (2 rows) against 62, and at 3-4 rows unchanged
 * (36-45 GB/s: the widening is the limit there). Both bfloat16, vdpbf16ps: 3 and 4 rows in one
 * pass (the 32 AVX-512 registers hold their 16 accumulators) and the prefetch: 69, 67 and 63 GB/s
 * (2, 3, 4 rows) against 64, 56 and 43 with pairs and no prefetch, where the sum read 64-70.
 *
 * Both bfloat16 with 2 or more rows of x: W is read in groups of 4 rows (rows4_dp, gemv.h) with 64
 * channels of x held in registers, so 64 bytes of W cost 2 loads where row_dp's X rows cost X + 1
 * (the core's load ports were its limit: 5 loads per 4 products at 4 rows). The group's next
 * neighbour is prefetched in memory order, as one stream: each of the 4 rows prefetched ahead on
 * its own (4 streams a row apart) streamed 20-30% slower. Eight 3584 x 1024 matrices in turn (88
 * MB, cold), 2 threads, single rows -> groups, means of 18 interleaved turns: with the memory at
 * ~70 GB/s and the VM's compute in its slow state, 54 -> 67 (2 rows of x), 40 -> 67 (3) and 29 ->
 * 62 GB/s (4); in its normal state 71-72 -> 67-68, 64-68 -> 64-67 and 65 -> 67-69; with the memory
 * at ~45 GB/s, 31-34 -> 47-48 at 4 rows. One thread, one matrix in L3 (the compute's own speed): 78
 * -> 92, 67 -> 88 and 58 -> 81 GB/s.
 *
 * Float32 with 4 or more rows of x on a CPU with AVX-512F (dispatched at run time: the library is
 * built for AVX2): the same groups (rows4_f32, 32 channels of x a step), through llmkit_rows_f32.
 * Six float32 3584 x 1024 matrices in turn (88 MB, cold), 2 threads, pairs -> groups, memory at
 * 60-75 GB/s: 46-55 -> 49-60 GB/s at 4 rows; one thread, one matrix in L3: 38 -> 79-82. At 3 rows
 * the groups streamed 4-9% slower cold and at 2 no faster, so 2-3 rows keep the pairs.
 *
 * Both operands in bfloat16 (`llmkit_gemv_bf16x`: a bfloat16 model's activations, which widen
 * exactly): on a CPU with AVX512_BF16, one vdpbf16ps multiplies 32 pairs of x and W and adds them
 * to 16 float32 sums (products of two bfloat16 are exact in float32; denormal inputs and outputs
 * count as zero): three instructions per 64 bytes of weights (two loads and the product) where
 * the widening above takes fourteen; elsewhere x is widened and the path above runs. Dispatched at
 * run time, as the library is built for AVX2.
 *
 * The row kernels are in gemv.h, shared with moe.c. Built by llmkit_backend_cpu/kernels.py with the
 * other kernels (-O3 -mavx2 -mfma -mf16c -fopenmp).
 */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "gemv.h"

static void gemv(const float *x, const float *xs, int64_t M, int64_t K, const void *w, int64_t N, float *y, int bf16) {
#pragma omp parallel
  {
    int64_t lo, hi;
    share(N, 1, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    if (bf16)
      rows(x, xs, M, K, w, lo, hi, y, N, 1);
    else
      llmkit_rows_f32(x, M, K, w, lo, hi, y, N);
  }
}

#ifdef HAVE_AVX512
NATIVE_BF16 void llmkit_rows_dp(const uint16_t *x, int64_t X, int64_t K, const uint16_t *w, int64_t lo, int64_t hi,
                                float *y, int64_t ldy) {
  int64_t i = lo;
  if (X > 1)
    for (; i + 4 <= hi; i += 4)
      for (int64_t r = 0; r < X; r += 4)
        switch (X - r >= 4 ? 4 : X - r) {
          case 4: rows4_dp(x + r * K, 4, K, w + i * K, y + r * ldy + i, ldy); break;
          case 3: rows4_dp(x + r * K, 3, K, w + i * K, y + r * ldy + i, ldy); break;
          case 2: rows4_dp(x + r * K, 2, K, w + i * K, y + r * ldy + i, ldy); break;
          default: rows4_dp(x + r * K, 1, K, w + i * K, y + r * ldy + i, ldy);
        }
  for (; i < hi; ++i)
    for (int64_t r = 0; r < X; r += 4)
      switch (X - r >= 4 ? 4 : X - r) {
        case 4: row_dp(x + r * K, 4, K, w + i * K, y + r * ldy + i, ldy); break;
        case 3: row_dp(x + r * K, 3, K, w + i * K, y + r * ldy + i, ldy); break;
        case 2: row_dp(x + r * K, 2, K, w + i * K, y + r * ldy + i, ldy); break;
        default: row_dp(x + r * K, 1, K, w + i * K, y + r * ldy + i, ldy);
      }
}

/* llmkit_rows_f32's groups of 4 rows of W from lo on; returns the first row after them. */
static AVX512F int64_t rows_f32_groups(const float *x, int64_t X, int64_t K, const float *w, int64_t lo, int64_t hi,
                                       float *y, int64_t ldy) {
  for (; lo + 4 <= hi; lo += 4)
    for (int64_t r = 0; r < X; r += 4)
      switch (X - r >= 4 ? 4 : X - r) {
        case 4: rows4_f32(x + r * K, 4, K, w + lo * K, y + r * ldy + lo, ldy); break;
        case 3: rows4_f32(x + r * K, 3, K, w + lo * K, y + r * ldy + lo, ldy); break;
        case 2: rows4_f32(x + r * K, 2, K, w + lo * K, y + r * ldy + lo, ldy); break;
        default: rows4_f32(x + r * K, 1, K, w + lo * K, y + r * ldy + lo, ldy);
      }
  return lo;
}
#endif

static int native_bf16 = -1; /* whether llmkit_gemv_bf16x uses vdpbf16ps; -1: not yet asked */

/* Turns the vdpbf16ps path on (where the CPU has it and the compiler built it) or off; returns
 * whether it is on. For tests of the other path on a CPU that has it. */
int llmkit_gemv_native_bf16(int on) {
#ifdef HAVE_AVX512
  native_bf16 = on && __builtin_cpu_supports("avx512bf16");
#else
  (void)on;
  native_bf16 = 0;
#endif
  return native_bf16;
}

int llmkit_native_bf16(void) { return native_bf16 < 0 ? llmkit_gemv_native_bf16(1) : native_bf16; }

static int avx512_off; /* set by tests of the AVX2 path on a CPU with AVX-512F */

/* Turns llmkit_rows_f32's AVX-512F path on (where the CPU has it and the compiler built it) or off;
 * returns whether it is on. */
int llmkit_gemv_avx512(int on) {
  avx512_off = !on;
#ifdef HAVE_AVX512
  return on && __builtin_cpu_supports("avx512f");
#else
  return 0;
#endif
}

void llmkit_rows_f32(const float *x, int64_t X, int64_t K, const float *w, int64_t lo, int64_t hi, float *y,
                     int64_t ldy) {
#ifdef HAVE_AVX512
  if (X > 3 && !avx512_off && __builtin_cpu_supports("avx512f")) lo = rows_f32_groups(x, X, K, w, lo, hi, y, ldy);
#endif
  rows(x, x, X, K, w, lo, hi, y, ldy, 0);
}

/* y [M, N] float32 = x [M, K] float32 @ W^T, W [N, K] row-major float32 / bfloat16 bit patterns.
 * 0 on success; the bfloat16 one returns 1 if it cannot allocate x's split copy (M * K floats). */
int llmkit_gemv_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y) {
  gemv(x, x, M, K, w, N, y, 0);
  return 0;
}

int llmkit_gemv_bf16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y) {
  float *xs = (float *)malloc(sizeof(float) * (size_t)(M * K > 0 ? M * K : 1));
  if (!xs) return 1;
  for (int64_t r = 0; r < M; ++r) split(x + r * K, K, 0, K, xs + r * K);
  gemv(x, xs, M, K, w, N, y, 1);
  free(xs);
  return 0;
}

/* y [M, N] float32 = x [M, K] @ W^T, x and W [N, K] both bfloat16 bit patterns. 0 on success, 1 if
 * x's float32 copy (without AVX512_BF16) cannot be allocated. */
int llmkit_gemv_bf16x(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y) {
#ifdef HAVE_AVX512
  if (llmkit_native_bf16()) {
#pragma omp parallel
    {
      int64_t lo, hi;
      share(N, 1, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
      llmkit_rows_dp(x, M, K, w, lo, hi, y, N);
    }
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
