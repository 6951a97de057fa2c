/* The operands of llmkit_moe_decode (moe.c), filled in by ops.cpp. Sizes: n tokens, d = d_model,
 * f = the experts' hidden size, e experts, k = top_k. */
#ifndef LLMKIT_MOE_H
#define LLMKIT_MOE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int64_t n, d, f, e, k;
  int bf16;                           /* x, router, experts' weights and biases, out: bfloat16; else float32 */
  int scoring;                        /* 0 softmax, 1 sigmoid */
  int64_t n_group, topk_group;        /* group-limited routing; 0, 0: none */
  int renormalize;                    /* 1: the top-k weights divided by their sum */
  float routed_scaling;
  int64_t capacity;                   /* assignments an expert serves; -1: all */
  int activation;                     /* 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu */
  const void *x, *router;             /* [n, d], [e, d] */
  const float *correction_bias;       /* [e] float32, or NULL */
  const void *w_gate, *w_up, *w_down; /* [e, f, d] (NULL: ungated experts), [e, f, d], [e, d, f] */
  const void *b_gate, *b_up, *b_down; /* [e, f], [e, f], [e, d], or NULL */
  void *out;                          /* [n, d] */
  float *logits, *scores;             /* [n, e] */
  int64_t *selected;                  /* [n, k] */
  float *weights;                     /* [n, k] */
  int64_t *counts;                    /* [e] */
} llmkit_moe;

/* 0 on success, 1 if its scratch memory cannot be allocated, 2 if an exact tie decided the routing
 * (the routing outputs are written, out is not; moe.c). */
int llmkit_moe_decode(const llmkit_moe *m);

/* moe_experts' hidden values (ops.cpp): g[i] = act(g[i]) * u[i] for i < n, computed in float32
 * and rounded once where g and u are bfloat16 (else float32); act(g[i]) alone where u is NULL
 * (ungated experts). activation as llmkit_moe's. */
void llmkit_moe_activate(int activation, int bf16, int64_t n, void *g, const void *u);

#ifdef __cplusplus
}
#endif

#endif
