/* moe_decode: a whole moe@1 layer (llmkit_blocks/moe.py's formula, less the shared expert) for a
 * few tokens in one call: routing, every active expert and the weighted sum, for cpu.grouped at
 * decode.
 *
 * Why one call: at one token the layer must read two experts' weights, which a GEMV streams at the
 * memory's speed (gemv.c), and the rest is small operations. Run as PyTorch operations, with the
 * caches cold as a layer in a model finds them (the other layers ran in between), that rest cost
 * as much as the GEMVs' distance to the roofline: in the Mixtral-proportioned layer of
 * benchmarks/moe_layer.py (AVX-512 EPYC, 2 threads), the routing alone took 0.11 ms in float32
 * and 0.21 ms in bfloat16, and the layer 0.35-0.6 ms more than its six GEMVs (README, MoE layer).
 *
 * Formula (as the catalogue's, in float32):
 *   logits = x W_r^T; scores = softmax(logits) | sigmoid(logits); choice = scores + correction bias,
 *   groups outside the topk_group best (each scored by its two best choices) set to -inf;
 *   selected = the top_k choices, largest first (exact ties: below); weights = scores[selected],
 *   / their sum if renormalised, * routed_scaling; each expert serves its first `capacity`
 *   (token, slot) assignments in token order;
 *   out[t] = sum over t's served assignments, in expert order, of
 *            weight * (W_down[e] (act(W_gate[e] x + b_gate[e]) * (W_up[e] x + b_up[e])) + b_down[e])
 *   (ungated: act(W_up[e] x + b_up[e])).
 * Every product and sum is float32, rounded once to bfloat16 at the end for a bfloat16 layer, where
 * the catalogue's reference rounds the logits, each product and the routing weights to bfloat16
 * (the precision rule compares both with float64; a near-tie may route differently). With bfloat16
 * weights on a CPU with AVX512_BF16 the hidden activations are rounded to bfloat16 for vdpbf16ps.
 *
 * Where an exact tie decides a pick (equal router rows, a zeroed router), the result would depend on
 * how a top-k breaks ties, which PyTorch's topk leaves to its implementation: the kernel then
 * stops after the routing and says so, and cpu.grouped routes that call with the catalogue's
 * code, so that its choices do not depend on how many tokens a call has.
 *
 * One OpenMP region, three phases split by barriers: the router's rows over the threads; the
 * routing (one thread: n * e values); then every active expert's gate and up rows, each thread one
 * contiguous range of hidden rows (blocks of 16) in every expert, with the activation applied to
 * its own range; then the down rows, each thread a range of output channels, summing the
 * assignments in expert order into them, so no two threads write the same value and the result
 * does not depend on the thread count. The products are gemv.h's row kernels.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "gemv.h"
#include "moe.h"

/* How rows of activations meet a matrix: float32 both; bfloat16 W with float32 rows (x widened,
 * and split as load16 reads it); bfloat16 both through vdpbf16ps. */
enum { F32, WIDE, DP };

typedef struct {
  const float *x, *xs;
  const uint16_t *xb;
} act_rows;

/* y[j * ldy + i] = rows i in [lo, hi) of w [., K] times the X rows of a. */
static void product(int kind, act_rows a, int64_t X, int64_t K, const void *w, int64_t lo, int64_t hi, float *y,
                    int64_t ldy) {
  if (kind == F32)
    llmkit_rows_f32(a.x, X, K, (const float *)w, lo, hi, y, ldy);
  else if (kind == WIDE)
    rows(a.x, a.xs, X, K, w, lo, hi, y, ldy, 1);
#ifdef HAVE_AVX512
  else
    llmkit_rows_dp(a.xb, X, K, (const uint16_t *)w, lo, hi, y, ldy);
#endif
}

/* mlp@1's activations (blocks/mlp.py): silu x sigmoid(x), gelu with erf, gelu's tanh form, relu. */
static inline float activate(int activation, float v) {
  switch (activation) {
    case 0: return v / (1.0f + expf(-v));
    case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case 2: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v < 0.0f ? 0.0f : v;
  }
}

/* 8 values of b (bfloat16 or float32) from i on; 0 where b is absent. */
static inline __m256 load8(const void *b, int64_t i, int bf16) {
  if (!b) return _mm256_setzero_ps();
  if (!bf16) return _mm256_loadu_ps((const float *)b + i);
  const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)b + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* v rounded to bfloat16 as to_bf16 does, 8 at a time. */
static inline void store_bf16(uint16_t *p, __m256 v) {
  const __m256i b = _mm256_castps_si256(v), one = _mm256_set1_epi32(1);
  __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(b, 16), one)));
  r = _mm256_srli_epi32(r, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40)), nan);
  _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

/* e^x for x clamped to [-87, 88] (both ends normal floats): x = n ln2 + r with |r| <= ln2 / 2
 * (ln2 in two parts, Cody and Waite), e^r by its Taylor series to r^7 (truncation below 6e-9
 * relative), 2^n written into the exponent. */
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  static const float inverse_factorial[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  __m256 p = _mm256_set1_ps(inverse_factorial[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(inverse_factorial[i]));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* activate, 8 at a time: silu as v / (1 + e^-v), gelu_tanh as v / (1 + e^-2u) (the same as
 * 0.5 v (1 + tanh u)), relu; gelu's erf one value at a time. */
static inline __m256 activate8(int activation, __m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  if (activation == 0) return _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, v))));
  if (activation == 2) {
    const __m256 c = _mm256_set1_ps(-2.0f * 0.79788456080286536f), v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
    const __m256 u2 = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), v3, v));
    return _mm256_div_ps(v, _mm256_add_ps(one, exp8(u2)));
  }
  if (activation == 3) return _mm256_max_ps(zero, v); /* max(0, NaN) is NaN */
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  for (int i = 0; i < 8; ++i) lanes[i] = activate(activation, lanes[i]);
  return _mm256_loadu_ps(lanes);
}

void llmkit_moe_activate(int activation, int bf16, int64_t n, void *g, const void *u) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = activate8(activation, load8(g, i, bf16));
    if (u) v = _mm256_mul_ps(v, load8(u, i, bf16));
    if (bf16)
      store_bf16((uint16_t *)g + i, v);
    else
      _mm256_storeu_ps((float *)g + i, v);
  }
  for (; i < n; ++i) {
    const float v = activate(activation, load1(g, i, bf16)) * (u ? load1(u, i, bf16) : 1.0f);
    if (bf16)
      ((uint16_t *)g)[i] = to_bf16(v);
    else
      ((float *)g)[i] = v;
  }
}

/* One assignment's hidden activations over [lo, hi): g (the gate's products; replaced by the
 * hidden values) and u (the up ones) of expert e, plus their biases; also rounded to bfloat16 into
 * hb for vdpbf16ps (kind DP). */
static void hidden(const llmkit_moe *m, int kind, int64_t e, int64_t lo, int64_t hi, float *g, const float *u,
                   uint16_t *hb) {
  const int64_t at = e * m->f;
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256 up = _mm256_add_ps(_mm256_loadu_ps(u + i), load8(m->b_up, at + i, m->bf16));
    const __m256 v = m->w_gate ? _mm256_mul_ps(activate8(m->activation, _mm256_add_ps(_mm256_loadu_ps(g + i),
                                                                                      load8(m->b_gate, at + i, m->bf16))), up)
                               : activate8(m->activation, up);
    _mm256_storeu_ps(g + i, v);
    if (kind == DP) store_bf16(hb + i, v);
  }
  for (; i < hi; ++i) {
    const float up = u[i] + (m->b_up ? load1(m->b_up, at + i, m->bf16) : 0.0f);
    const float v = m->w_gate ? activate(m->activation, g[i] + (m->b_gate ? load1(m->b_gate, at + i, m->bf16) : 0.0f)) * up
                              : activate(m->activation, up);
    g[i] = v;
    if (kind == DP) hb[i] = to_bf16(v);
  }
}

/* out[r] over [lo, hi): the sum over token r's `owned` served assignments `own` (in expert order;
 * expert a_e, weight a_w, down products yd [., d]) of weight * (down + b_down). */
static void weighted_sum(const llmkit_moe *m, int64_t r, int64_t lo, int64_t hi, const int64_t *own, int64_t owned,
                         const int64_t *a_e, const float *a_w, const float *yd) {
  const int64_t D = m->d;
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    __m256 sum = _mm256_setzero_ps();
    for (int64_t q = 0; q < owned; ++q) {
      const int64_t a = own[q];
      sum = _mm256_fmadd_ps(_mm256_set1_ps(a_w[a]),
                            _mm256_add_ps(_mm256_loadu_ps(yd + a * D + i), load8(m->b_down, a_e[a] * D + i, m->bf16)), sum);
    }
    if (m->bf16)
      store_bf16((uint16_t *)m->out + r * D + i, sum);
    else
      _mm256_storeu_ps((float *)m->out + r * D + i, sum);
  }
  for (; i < hi; ++i) {
    float sum = 0.0f;
    for (int64_t q = 0; q < owned; ++q) {
      const int64_t a = own[q];
      sum += a_w[a] * (yd[a * D + i] + (m->b_down ? load1(m->b_down, a_e[a] * D + i, m->bf16) : 0.0f));
    }
    if (m->bf16)
      ((uint16_t *)m->out)[r * D + i] = to_bf16(sum);
    else
      ((float *)m->out)[r * D + i] = sum;
  }
}

/* The end of the run of assignments to a_e[a0]'s expert that starts at a0 (they are sorted by expert). */
static int64_t run_end(const int64_t *a_e, int64_t served, int64_t a0) {
  int64_t a1 = a0 + 1;
  while (a1 < served && a_e[a1] == a_e[a0]) ++a1;
  return a1;
}

/* The index of the largest of v[0..n) not yet taken (the lower on ties), marked taken. */
static int64_t take_max(const float *v, int64_t n, char *taken) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
  taken[best] = 1;
  return best;
}

/* Whether an exact tie decided take_max's picks from v[0..n) (taken marks them, `last` the final
 * one): a value left out equal to it. */
static int boundary_tie(const float *v, int64_t n, const char *taken, int64_t last) {
  for (int64_t i = 0; i < n; ++i)
    if (!taken[i] && v[i] == v[last]) return 1;
  return 0;
}

/* Token t's scores, choices, top_k and weights (module docstring); choice [e], group [n_group] and
 * taken [e] are scratch. Returns 1 if an exact tie decided a pick (of a group, of an expert, or
 * the order of two picked experts), where the result would depend on how a top-k breaks ties. */
static int route(const llmkit_moe *m, int64_t t, float *choice, float *group, char *taken) {
  const int64_t E = m->e, k = m->k;
  int tie = 0;
  const float *l = m->logits + t * E;
  float *s = m->scores + t * E, *w = m->weights + t * k;
  int64_t *sel = m->selected + t * k;
  if (m->scoring == 0) {
    float top = -INFINITY, sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) top = fmaxf(top, l[e]);
    for (int64_t e = 0; e < E; ++e) sum += s[e] = expf(l[e] - top);
    for (int64_t e = 0; e < E; ++e) s[e] /= sum;
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + expf(-l[e]));
  }
  for (int64_t e = 0; e < E; ++e) choice[e] = s[e] + (m->correction_bias ? m->correction_bias[e] : 0.0f);
  if (m->n_group) {
    const int64_t per = E / m->n_group;
    for (int64_t g = 0; g < m->n_group; ++g) {
      float first = -INFINITY, second = -INFINITY;
      for (int64_t e = g * per; e < (g + 1) * per; ++e) {
        if (choice[e] > first) {
          second = first;
          first = choice[e];
        } else if (choice[e] > second) {
          second = choice[e];
        }
      }
      group[g] = first + second;
      taken[g] = 0;
    }
    int64_t last = 0;
    for (int64_t j = 0; j < m->topk_group; ++j) last = take_max(group, m->n_group, taken);
    tie |= boundary_tie(group, m->n_group, taken, last);
    for (int64_t e = 0; e < E; ++e)
      if (!taken[e / per]) choice[e] = -INFINITY;
  }
  for (int64_t e = 0; e < E; ++e) taken[e] = 0;
  float sum = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    sel[j] = take_max(choice, E, taken);
    sum += w[j] = s[sel[j]];
    m->counts[sel[j]] += 1;
    tie |= j > 0 && choice[sel[j]] == choice[sel[j - 1]];
  }
  for (int64_t j = 0; j < k; ++j) w[j] = (m->renormalize ? w[j] / sum : w[j]) * m->routed_scaling;
  return tie | boundary_tie(choice, E, taken, sel[k - 1]);
}

int llmkit_moe_decode(const llmkit_moe *m) {
  const int64_t n = m->n, D = m->d, F = m->f, E = m->e, k = m->k, A = n * k;
  const int kind = !m->bf16 ? F32 : llmkit_native_bf16() ? DP : WIDE;
  const size_t es = m->bf16 ? 2 : 4;
  /* scratch: the assignments' experts [A], each token's assignments [n, k] and their number [n]; x
   * widened and split [n, d] x 2, its rows per assignment [A, d] x 2 (widened and split, or
   * bfloat16), gate / hidden and up [A, f] x 2, the hidden split or bfloat16 [A, f], down [A, d],
   * the assignments' weights [A], choice [e], group scores [e]; taken [e] */
  const size_t floats = 2 * (size_t)n * D + 3 * (size_t)A * D + 3 * (size_t)A * F + (size_t)A + 2 * (size_t)E;
  char *scratch = malloc(sizeof(int64_t) * (2 * (size_t)A + (size_t)n) + sizeof(float) * floats + (size_t)E);
  if (!scratch) return 1;
  int64_t *a_e = (int64_t *)scratch, *own = a_e + A, *owned = own + A;
  float *xw = (float *)(owned + n), *xws = xw + n * D, *xg = xws + n * D, *xgs = xg + A * D, *g = xgs + A * D,
        *u = g + A * F, *hs = u + A * F, *yd = hs + A * F, *a_w = yd + A * D, *choice = a_w + A, *group = choice + E;
  char *taken = (char *)(group + E);
  const uint16_t *xb = (const uint16_t *)m->x;
  uint16_t *xgb = (uint16_t *)xgs, *hb = (uint16_t *)hs; /* the bfloat16 forms of DP share the split ones' room */
  if (kind == F32) {
    xw = (float *)m->x;
  } else if (kind == WIDE) {
    for (int64_t i = 0; i < n * D; ++i) xw[i] = load1(xb, i, 1);
    for (int64_t r = 0; r < n; ++r) split(xw + r * D, D, 0, D, xws + r * D);
  }
  const act_rows x = {xw, xws, xb};
  for (int64_t e = 0; e < E; ++e) m->counts[e] = 0;
  int64_t served = 0;
  int tie = 0;

#pragma omp parallel
  {
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t lo, hi;
    share(E, 1, t, T, &lo, &hi);
    product(kind, x, n, D, m->router, lo, hi, m->logits, E);
#pragma omp barrier
#pragma omp single
    {
      for (int64_t r = 0; r < n; ++r) {
        tie |= route(m, r, choice, group, taken);
        owned[r] = 0;
      }
      for (int64_t e = 0; e < E && !tie; ++e) {
        int64_t count = 0;
        for (int64_t i = 0; i < A; ++i)
          if (m->selected[i] == e && (m->capacity < 0 || count < m->capacity)) {
            const int64_t r = i / k;
            a_e[served] = e;
            own[r * k + owned[r]++] = served;
            a_w[served] = m->weights[i];
            if (kind == DP) {
              for (int64_t c = 0; c < D; ++c) xgb[served * D + c] = xb[r * D + c];
            } else {
              for (int64_t c = 0; c < D; ++c) xg[served * D + c] = xw[r * D + c];
              if (kind == WIDE)
                for (int64_t c = 0; c < D; ++c) xgs[served * D + c] = xws[r * D + c];
            }
            ++served;
            ++count;
          }
      }
    }
    share(F, 16, t, T, &lo, &hi);
    for (int64_t a0 = 0, a1; a0 < served; a0 = a1) {
      const int64_t e = a_e[a0];
      a1 = run_end(a_e, served, a0);
      const act_rows in = {xg + a0 * D, xgs + a0 * D, xgb + a0 * D};
      if (m->w_gate) product(kind, in, a1 - a0, D, (const char *)m->w_gate + e * F * D * es, lo, hi, g + a0 * F, F);
      product(kind, in, a1 - a0, D, (const char *)m->w_up + e * F * D * es, lo, hi, u + a0 * F, F);
      for (int64_t j = a0; j < a1; ++j) {
        hidden(m, kind, e, lo, hi, g + j * F, u + j * F, hb + j * F);
        if (kind == WIDE) split(g + j * F, F, lo, hi, hs + j * F);
      }
    }
#pragma omp barrier
    share(D, 1, t, T, &lo, &hi);
    for (int64_t a0 = 0, a1; a0 < served; a0 = a1) {
      const int64_t e = a_e[a0];
      a1 = run_end(a_e, served, a0);
      const act_rows h = {g + a0 * F, hs + a0 * F, hb + a0 * F};
      product(kind, h, a1 - a0, F, (const char *)m->w_down + e * D * F * es, lo, hi, yd + a0 * D, D);
    }
    for (int64_t r = 0; r < n; ++r) weighted_sum(m, r, lo, hi, own + r * k, owned[r], a_e, a_w, yd);
  }
  free(scratch);
  return tie ? 2 : 0;
}
