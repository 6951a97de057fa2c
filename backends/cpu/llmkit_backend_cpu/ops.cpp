// The dispatcher kernels of `llmkit_cpu::linear_w4a8(Tensor x, Tensor w, Tensor s) -> Tensor`,
// `llmkit_cpu::linear_f16(Tensor x, Tensor w) -> Tensor`, `llmkit_cpu::gemv(Tensor x, Tensor w) -> Tensor`
// `llmkit_cpu::moe_decode(...) -> (Tensor, ...)` and `llmkit_cpu::moe_experts(...) -> Tensor` (the
// schemas in kernels.py).
//
// Registered from C++ through libtorch's stable C API (the shim of
// torch/csrc/inductor/aoti_torch/c/shim.h): a call from Python, or from a compiled decode step's
// wrapper, goes from the dispatcher straight to the C kernel, without the way back into Python
// that an op implemented in Python takes (5-10 us a call on this plugin's AVX2 VM; a SmolLM2 step
// makes 121 of them). The schemas and the fake impls are defined in kernels.py.
//
// linear_w4a8: x [M, K] float32, w [N/8, 4K] uint8 (tiles of 8 rows), s [N/8, K/32, 2, 8] float32
// (per tile and group: the 8 rows' scales d, then minima m); formula and layout in w4a8.c.
// linear_f16: x [M, K] float32, w [N/8, K, 8] float16 (tiles of 8 rows); layout in f16.c.
// gemv: x [M, K] float32, w [N, K] float32 or bfloat16 (row-major, as stored), or x and w both
// bfloat16; gemv.c.
// All operands contiguous CPU tensors; each returns y [M, N] float32 (N a multiple of 8 for the
// first two).
// moe_decode: a moe@1 layer for a few tokens x [n, d] float32 or bfloat16, its parameters in x's
// dtype (the correction bias float32), an absent one (w_gate, the biases) as an empty tensor; returns
// out [n, d] in x's dtype, logits and scores [n, e] float32, selected [n, k] int64, weights [n, k]
// float32, counts [e] int64, info [3] int64: whether an exact tie decided the routing (1: out is
// then not computed, and the caller routes), the largest count, the assignments beyond `capacity`
// (0 without), and aux_loss, a float32 zero scalar: with these the caller sets the routing
// statistics without a PyTorch operation of its own (moe.py); moe.c.
// moe_experts: x [m, d] float32 or bfloat16, the rows of several experts, grouped: expert
// experts[j] (int64 [a]) takes the next counts[j] (int64 [a]) rows; the experts' parameters as
// moe_decode's, in x's dtype; returns y [m, d] in x's dtype, each row its expert's output
// W_down (act(W_gate x + b_gate) * (W_up x + b_up)) + b_down (ungated: act(W_up x + b_up)), before
// any routing weight. The experts are spread over the OpenMP threads, largest first, each expert's
// three products one single-threaded GEMM each (PyTorch's CPU mm, MKL for float32, oneDNN for
// bfloat16): at about 128 rows a GEMM kept 90-93% of a 1024^3 product's rate on one thread of the
// AVX-512 VM, 71-87% on two (README, MoE layer). The hidden values: moe.c's llmkit_moe_activate.
#include <omp.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" int llmkit_w4a8_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *sc,
                                  int64_t N8, float *y);
extern "C" void llmkit_f16_linear(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N8, float *y);
extern "C" int llmkit_gemv_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y);
extern "C" int llmkit_gemv_bf16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y);
extern "C" int llmkit_gemv_bf16x(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y);

#include "moe.h"

namespace {

// A tensor handle the kernel owns and frees: an input (the dispatcher passes each tensor as a new
// handle) or one the kernel made.
struct Owned {
  AtenTensorHandle handle = nullptr;
  Owned() = default;
  explicit Owned(AtenTensorHandle h) : handle(h) {}
  explicit Owned(StableIValue value) : handle(reinterpret_cast<AtenTensorHandle>(value)) {}
  ~Owned() {
    if (handle) aoti_torch_delete_tensor_object(handle);
  }
  Owned(const Owned &) = delete;
  Owned &operator=(const Owned &) = delete;
};

void check(AOTITorchError error, const char *op, const char *what) {
  if (error != AOTI_TORCH_SUCCESS) throw std::runtime_error(std::string("llmkit_cpu::") + op + ": " + what + " failed");
}

// The sizes of a contiguous CPU tensor of the given dtype and rank (else a precise error).
const int64_t *expect(const char *op, const Owned &t, const char *name, int32_t dtype, const char *dtype_name,
                      int64_t rank) {
  int32_t got_dtype, device;
  int64_t dim;
  bool contiguous;
  check(aoti_torch_get_dtype(t.handle, &got_dtype), op, "reading a dtype");
  check(aoti_torch_get_device_type(t.handle, &device), op, "reading a device");
  check(aoti_torch_get_dim(t.handle, &dim), op, "reading a rank");
  check(aoti_torch_is_contiguous(t.handle, &contiguous), op, "reading a layout");
  if (got_dtype != dtype || device != aoti_torch_device_type_cpu() || dim != rank || !contiguous)
    throw std::runtime_error(std::string("llmkit_cpu::") + op + ": " + name + " must be a contiguous " +
                             std::to_string(rank) + "-d CPU " + dtype_name + " tensor");
  int64_t *sizes;
  check(aoti_torch_get_sizes(t.handle, &sizes), op, "reading sizes");
  return sizes;
}

void *data(const char *op, AtenTensorHandle t) {
  void *ptr;
  check(aoti_torch_get_data_ptr(t, &ptr), op, "reading a data pointer");
  return ptr;
}

// A new contiguous CPU tensor of the given sizes (rank 0, 1 or 2) and dtype (an op's output).
AtenTensorHandle empty(const char *op, int64_t rank, const int64_t *sizes, int32_t dtype) {
  const int64_t strides[2] = {rank == 2 ? sizes[1] : 1, 1};
  AtenTensorHandle y;
  check(aoti_torch_empty_strided(rank, sizes, strides, dtype, aoti_torch_device_type_cpu(), 0, &y), op,
        "allocating an output");
  return y;
}

// A new [M, N] float32 CPU tensor (the op's output).
AtenTensorHandle output(const char *op, int64_t M, int64_t N) {
  const int64_t sizes[2] = {M, N};
  return empty(op, 2, sizes, aoti_torch_dtype_float32());
}

// Runs `kernel` into the op's new output y, then hands y to the dispatcher; y is freed if it throws.
template <class Kernel>
void finish(StableIValue *stack, AtenTensorHandle y, Kernel kernel) {
  try {
    kernel();
  } catch (...) {
    aoti_torch_delete_tensor_object(y);
    throw;
  }
  stack[0] = reinterpret_cast<StableIValue>(y);
}

void linear_w4a8(StableIValue *stack, uint64_t, uint64_t) {
  const char *op = "linear_w4a8";
  const Owned x(stack[0]), w(stack[1]), s(stack[2]);
  const int64_t *xs = expect(op, x, "x", aoti_torch_dtype_float32(), "float32", 2);
  const int64_t *ws = expect(op, w, "w", aoti_torch_dtype_uint8(), "uint8", 2);
  const int64_t *ss = expect(op, s, "s", aoti_torch_dtype_float32(), "float32", 4);
  const int64_t M = xs[0], K = xs[1], N8 = ws[0];
  if (K % 32 || ws[1] != 4 * K || ss[0] != N8 || ss[1] * 32 != K || ss[2] != 2 || ss[3] != 8)
    throw std::runtime_error("llmkit_cpu::linear_w4a8: shapes x [M, K], w [N/8, 4K], s [N/8, K/32, 2, 8] "
                             "with K a multiple of 32 expected, got K=" + std::to_string(K) + ", w [" +
                             std::to_string(ws[0]) + ", " + std::to_string(ws[1]) + "], s [" +
                             std::to_string(ss[0]) + ", " + std::to_string(ss[1]) + ", " +
                             std::to_string(ss[2]) + ", " + std::to_string(ss[3]) + "]");
  AtenTensorHandle y = output(op, M, 8 * N8);
  finish(stack, y, [&] {
    if (llmkit_w4a8_linear(static_cast<const float *>(data(op, x.handle)), M, K,
                           static_cast<const uint8_t *>(data(op, w.handle)), static_cast<const float *>(data(op, s.handle)),
                           N8, static_cast<float *>(data(op, y))))
      throw std::bad_alloc();  // the activations' int8 copy
  });
}

void linear_f16(StableIValue *stack, uint64_t, uint64_t) {
  const char *op = "linear_f16";
  const Owned x(stack[0]), w(stack[1]);
  const int64_t *xs = expect(op, x, "x", aoti_torch_dtype_float32(), "float32", 2);
  const int64_t *ws = expect(op, w, "w", aoti_torch_dtype_float16(), "float16", 3);
  const int64_t M = xs[0], K = xs[1], N8 = ws[0];
  if (ws[1] != K || ws[2] != 8)
    throw std::runtime_error("llmkit_cpu::linear_f16: shapes x [M, K], w [N/8, K, 8] expected, got K=" +
                             std::to_string(K) + ", w [" + std::to_string(ws[0]) + ", " + std::to_string(ws[1]) +
                             ", " + std::to_string(ws[2]) + "]");
  AtenTensorHandle y = output(op, M, 8 * N8);
  finish(stack, y, [&] {
    llmkit_f16_linear(static_cast<const float *>(data(op, x.handle)), M, K,
                      static_cast<const uint16_t *>(data(op, w.handle)), N8, static_cast<float *>(data(op, y)));
  });
}

void gemv(StableIValue *stack, uint64_t, uint64_t) {
  const char *op = "gemv";
  const Owned x(stack[0]), w(stack[1]);
  int32_t xtype, wtype;
  check(aoti_torch_get_dtype(x.handle, &xtype), op, "reading a dtype");
  check(aoti_torch_get_dtype(w.handle, &wtype), op, "reading a dtype");
  const int32_t bfloat16 = aoti_torch_dtype_bfloat16();
  const bool bf16x = xtype == bfloat16, bf16 = bf16x || wtype == bfloat16;
  const int64_t *xs = bf16x ? expect(op, x, "x", xtype, "float32 or bfloat16", 2)
                            : expect(op, x, "x", aoti_torch_dtype_float32(), "float32 or bfloat16", 2);
  const int64_t *ws = bf16 ? expect(op, w, "w", bfloat16, bf16x ? "bfloat16 (as x is)" : "float32 or bfloat16", 2)
                           : expect(op, w, "w", aoti_torch_dtype_float32(), "float32 or bfloat16", 2);
  const int64_t M = xs[0], K = xs[1], N = ws[0];
  if (ws[1] != K)
    throw std::runtime_error("llmkit_cpu::gemv: shapes x [M, K], w [N, K] expected, got K=" + std::to_string(K) +
                             ", w [" + std::to_string(ws[0]) + ", " + std::to_string(ws[1]) + "]");
  AtenTensorHandle y = output(op, M, N);
  finish(stack, y, [&] {
    const void *xp = data(op, x.handle), *wp = data(op, w.handle);
    float *yp = static_cast<float *>(data(op, y));
    const auto *xf = static_cast<const float *>(xp);
    const auto *xh = static_cast<const uint16_t *>(xp), *wh = static_cast<const uint16_t *>(wp);
    if (bf16x ? llmkit_gemv_bf16x(xh, M, K, wh, N, yp)
              : bf16 ? llmkit_gemv_bf16(xf, M, K, wh, N, yp)
                     : llmkit_gemv_f32(xf, M, K, static_cast<const float *>(wp), N, yp))
      throw std::bad_alloc();  // x's copy
  });
}

int64_t numel(const char *op, const Owned &t) {
  int64_t n;
  check(aoti_torch_get_numel(t.handle, &n), op, "reading a size");
  return n;
}

// A scalar argument (an int arrives as int64, a float as double, in the stack slot's bytes).
template <class T>
T scalar(StableIValue value) {
  T v;
  std::memcpy(&v, &value, sizeof v);
  return v;
}

// t's data if it has the expected sizes, else a precise error; an empty t is absent (nullptr) where
// `optional`.
const void *operand(const char *op, const Owned &t, const char *name, int32_t dtype, const char *dtype_name,
                    std::initializer_list<int64_t> sizes, bool optional = false) {
  if (optional && numel(op, t) == 0) return nullptr;
  const int64_t *got = expect(op, t, name, dtype, dtype_name, static_cast<int64_t>(sizes.size()));
  std::string want, have;
  bool same = true;
  int64_t i = 0;
  for (int64_t size : sizes) {
    want += (i ? ", " : "") + std::to_string(size);
    have += (i ? ", " : "") + std::to_string(got[i]);
    same = same && got[i] == size;
    ++i;
  }
  if (!same)
    throw std::runtime_error(std::string("llmkit_cpu::") + op + ": " + name + " must have shape [" + want + "]" +
                             (optional ? " (or be empty: absent)" : "") + ", got [" + have + "]");
  return data(op, t.handle);
}

void moe_decode(StableIValue *stack, uint64_t, uint64_t) {
  const char *op = "moe_decode";
  const Owned x(stack[0]), router(stack[1]), bias(stack[2]), w_gate(stack[3]), w_up(stack[4]), w_down(stack[5]),
      b_gate(stack[6]), b_up(stack[7]), b_down(stack[8]);
  llmkit_moe m{};
  m.k = scalar<int64_t>(stack[9]);
  const int64_t scoring = scalar<int64_t>(stack[10]), renormalize = scalar<int64_t>(stack[13]),
                activation = scalar<int64_t>(stack[16]);
  m.n_group = scalar<int64_t>(stack[11]);
  m.topk_group = scalar<int64_t>(stack[12]);
  m.routed_scaling = static_cast<float>(scalar<double>(stack[14]));
  m.capacity = scalar<int64_t>(stack[15]);
  int32_t xtype;
  check(aoti_torch_get_dtype(x.handle, &xtype), op, "reading a dtype");
  m.bf16 = xtype == aoti_torch_dtype_bfloat16();
  const int32_t dtype = m.bf16 ? xtype : aoti_torch_dtype_float32();
  const char *dtype_name = m.bf16 ? "bfloat16 (as x is)" : "float32 (as x is)";
  const int64_t *xs = expect(op, x, "x", dtype, "float32 or bfloat16", 2);
  m.n = xs[0];
  m.d = xs[1];
  m.e = expect(op, router, "router", dtype, dtype_name, 2)[0];
  m.f = expect(op, w_up, "w_up", dtype, dtype_name, 3)[1];
  const int64_t n = m.n, d = m.d, f = m.f, e = m.e, k = m.k;
  m.x = data(op, x.handle);
  m.router = operand(op, router, "router", dtype, dtype_name, {e, d});
  m.correction_bias = static_cast<const float *>(
      operand(op, bias, "correction_bias", aoti_torch_dtype_float32(), "float32", {e}, true));
  m.w_gate = operand(op, w_gate, "w_gate", dtype, dtype_name, {e, f, d}, true);
  m.w_up = operand(op, w_up, "w_up", dtype, dtype_name, {e, f, d});
  m.w_down = operand(op, w_down, "w_down", dtype, dtype_name, {e, d, f});
  m.b_gate = operand(op, b_gate, "b_gate", dtype, dtype_name, {e, f}, true);
  m.b_up = operand(op, b_up, "b_up", dtype, dtype_name, {e, f}, true);
  m.b_down = operand(op, b_down, "b_down", dtype, dtype_name, {e, d}, true);
  const bool groups_ok = m.n_group == 0 ? m.topk_group == 0
                                        : m.n_group > 0 && e % m.n_group == 0 && e / m.n_group >= 2 &&
                                              m.topk_group >= 1 && m.topk_group <= m.n_group;
  if (k < 1 || k > e || scoring < 0 || scoring > 1 || renormalize < 0 || renormalize > 1 || activation < 0 ||
      activation > 3 || m.capacity < -1 || !groups_ok)
    throw std::runtime_error("llmkit_cpu::moe_decode: options out of range: top_k " + std::to_string(k) + " (1.." +
                             std::to_string(e) + "), scoring " + std::to_string(scoring) +
                             " (0 softmax, 1 sigmoid), n_group " + std::to_string(m.n_group) + " / topk_group " +
                             std::to_string(m.topk_group) + " (0 / 0, or groups of >= 2 experts), renormalize " +
                             std::to_string(renormalize) + " (0, 1), capacity " + std::to_string(m.capacity) +
                             " (-1: none), activation " + std::to_string(activation) +
                             " (0 silu, 1 gelu, 2 gelu_tanh, 3 relu)");
  m.scoring = static_cast<int>(scoring);
  m.renormalize = static_cast<int>(renormalize);
  m.activation = static_cast<int>(activation);
  const int64_t nd[2] = {n, d}, ne[2] = {n, e}, nk[2] = {n, k}, ee[1] = {e}, three[1] = {3};
  AtenTensorHandle outs[8] = {};
  try {
    outs[0] = empty(op, 2, nd, dtype);
    outs[1] = empty(op, 2, ne, aoti_torch_dtype_float32());
    outs[2] = empty(op, 2, ne, aoti_torch_dtype_float32());
    outs[3] = empty(op, 2, nk, aoti_torch_dtype_int64());
    outs[4] = empty(op, 2, nk, aoti_torch_dtype_float32());
    outs[5] = empty(op, 1, ee, aoti_torch_dtype_int64());
    m.out = data(op, outs[0]);
    m.logits = static_cast<float *>(data(op, outs[1]));
    m.scores = static_cast<float *>(data(op, outs[2]));
    m.selected = static_cast<int64_t *>(data(op, outs[3]));
    m.weights = static_cast<float *>(data(op, outs[4]));
    m.counts = static_cast<int64_t *>(data(op, outs[5]));
    outs[6] = empty(op, 1, three, aoti_torch_dtype_int64());
    outs[7] = empty(op, 0, nullptr, aoti_torch_dtype_float32());
    const int status = llmkit_moe_decode(&m);
    if (status == 1) throw std::bad_alloc();  // its scratch memory
    int64_t *info = static_cast<int64_t *>(data(op, outs[6]));
    info[0] = status == 2;
    info[1] = info[2] = 0;
    for (int64_t i = 0; i < e; ++i) {
      info[1] = std::max(info[1], m.counts[i]);
      if (m.capacity >= 0) info[2] += std::max<int64_t>(m.counts[i] - m.capacity, 0);
    }
    *static_cast<float *>(data(op, outs[7])) = 0.0f;
  } catch (...) {
    for (AtenTensorHandle t : outs)
      if (t) aoti_torch_delete_tensor_object(t);
    throw;
  }
  for (int i = 0; i < 8; ++i) stack[i] = reinterpret_cast<StableIValue>(outs[i]);
}

// A view of t's storage: sizes and strides (rank 1 or 2) from element `offset` on.
AtenTensorHandle view(const char *op, AtenTensorHandle t, int64_t rank, const int64_t *sizes, const int64_t *strides,
                      int64_t offset) {
  AtenTensorHandle v;
  check(aoti_torch__reinterpret_tensor(t, rank, sizes, strides, offset, &v), op, "taking a view");
  return v;
}

// out = x w^T (+ b): w^T the view [K, N] of rows [N, K] at `offset` in w, b [N] at `boffset` in b.
void product(const char *op, AtenTensorHandle out, AtenTensorHandle x, AtenTensorHandle w, int64_t N, int64_t K,
             int64_t offset, AtenTensorHandle b, int64_t boffset) {
  const int64_t sizes[2] = {K, N}, strides[2] = {1, K};
  const Owned wt(view(op, w, 2, sizes, strides, offset));
  if (!b) {
    check(aoti_torch_cpu_mm_out(out, x, wt.handle), op, "a product (mm)");
    return;
  }
  const int64_t bsize[1] = {N}, bstride[1] = {1};
  const Owned bias(view(op, b, 1, bsize, bstride, boffset));
  check(aoti_torch_cpu_addmm_out(out, bias.handle, x, wt.handle, 1.0, 1.0), op, "a product (addmm)");
}

void moe_experts(StableIValue *stack, uint64_t, uint64_t) {
  const char *op = "moe_experts";
  const Owned x(stack[0]), experts(stack[1]), counts(stack[2]), w_gate(stack[3]), w_up(stack[4]), w_down(stack[5]),
      b_gate(stack[6]), b_up(stack[7]), b_down(stack[8]);
  const int64_t activation = scalar<int64_t>(stack[9]);
  int32_t xtype;
  check(aoti_torch_get_dtype(x.handle, &xtype), op, "reading a dtype");
  const bool bf16 = xtype == aoti_torch_dtype_bfloat16();
  const int32_t dtype = bf16 ? xtype : aoti_torch_dtype_float32();
  const char *dtype_name = bf16 ? "bfloat16 (as x is)" : "float32 (as x is)";
  const int64_t *xs = expect(op, x, "x", dtype, "float32 or bfloat16", 2);
  const int64_t m = xs[0], d = xs[1];
  const int32_t int64 = aoti_torch_dtype_int64();
  const int64_t a = expect(op, experts, "experts", int64, "int64", 1)[0];
  const int64_t *ws = expect(op, w_up, "w_up", dtype, dtype_name, 3);
  const int64_t e = ws[0], f = ws[1];
  const auto *ex = static_cast<const int64_t *>(operand(op, experts, "experts", int64, "int64", {a}));
  const auto *cn = static_cast<const int64_t *>(operand(op, counts, "counts", int64, "int64", {a}));
  operand(op, w_up, "w_up", dtype, dtype_name, {e, f, d});
  const bool gated = operand(op, w_gate, "w_gate", dtype, dtype_name, {e, f, d}, true);
  operand(op, w_down, "w_down", dtype, dtype_name, {e, d, f});
  const bool has_bg = operand(op, b_gate, "b_gate", dtype, dtype_name, {e, f}, true);
  const bool has_bu = operand(op, b_up, "b_up", dtype, dtype_name, {e, f}, true);
  const bool has_bd = operand(op, b_down, "b_down", dtype, dtype_name, {e, d}, true);
  std::vector<int64_t> offset(a + 1, 0);
  for (int64_t j = 0; j < a; ++j) {
    if (ex[j] < 0 || ex[j] >= e || cn[j] < 0)
      throw std::runtime_error("llmkit_cpu::moe_experts: experts[" + std::to_string(j) + "] = " +
                               std::to_string(ex[j]) + " (0.." + std::to_string(e - 1) + ") with counts[" +
                               std::to_string(j) + "] = " + std::to_string(cn[j]) + " (>= 0) expected");
    offset[j + 1] = offset[j] + cn[j];
  }
  if (offset[a] != m || activation < 0 || activation > 3 || (has_bg && !gated))
    throw std::runtime_error("llmkit_cpu::moe_experts: the counts must sum to x's " + std::to_string(m) +
                             " rows (they sum to " + std::to_string(offset[a]) + "), activation " +
                             std::to_string(activation) + " must be 0 silu, 1 gelu, 2 gelu_tanh or 3 relu, and "
                             "b_gate needs w_gate");
  std::vector<int64_t> order(a);  // largest first: the threads take them in turn (dynamic)
  for (int64_t j = 0; j < a; ++j) order[j] = j;
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return cn[i] > cn[j]; });
  const int64_t xy_sizes[2] = {m, d};
  AtenTensorHandle y = empty(op, 2, xy_sizes, dtype);
  finish(stack, y, [&] {
    std::atomic<bool> failed{false};
    std::string why;
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), a)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < a; ++i) {
      const int64_t j = order[i], rows = cn[j], ej = ex[j];
      if (rows == 0 || failed.load()) continue;
      try {
        const int64_t sizes[2] = {rows, d}, strides[2] = {d, 1}, hidden_sizes[2] = {rows, f};
        const Owned xj(view(op, x.handle, 2, sizes, strides, offset[j] * d)),
            yj(view(op, y, 2, sizes, strides, offset[j] * d)), up(empty(op, 2, hidden_sizes, dtype));
        product(op, up.handle, xj.handle, w_up.handle, f, d, ej * f * d, has_bu ? b_up.handle : nullptr, ej * f);
        Owned gate;
        if (gated) {
          gate.handle = empty(op, 2, hidden_sizes, dtype);
          product(op, gate.handle, xj.handle, w_gate.handle, f, d, ej * f * d, has_bg ? b_gate.handle : nullptr,
                  ej * f);
        }
        const Owned &hidden = gated ? gate : up;
        llmkit_moe_activate(static_cast<int>(activation), bf16, rows * f, data(op, hidden.handle),
                            gated ? data(op, up.handle) : nullptr);
        product(op, yj.handle, hidden.handle, w_down.handle, d, f, ej * d * f, has_bd ? b_down.handle : nullptr,
                ej * d);
      } catch (const std::exception &error) {
        if (!failed.exchange(true)) why = error.what();
      }
    }
    if (failed.load()) throw std::runtime_error(why);
  });
}

}  // namespace

// Registers the CPU kernels (once: kernels.py calls it after loading the library). 0 on success.
extern "C" int llmkit_cpu_register(void) {
  TorchLibraryHandle lib;  // kept for the life of the process, as TORCH_LIBRARY_IMPL's would be
  if (aoti_torch_library_init_impl("llmkit_cpu", "CPU", __FILE__, __LINE__, &lib) != AOTI_TORCH_SUCCESS) return -1;
  if (aoti_torch_library_impl(lib, "linear_w4a8", linear_w4a8) != AOTI_TORCH_SUCCESS) return -1;
  if (aoti_torch_library_impl(lib, "linear_f16", linear_f16) != AOTI_TORCH_SUCCESS) return -1;
  if (aoti_torch_library_impl(lib, "gemv", gemv) != AOTI_TORCH_SUCCESS) return -1;
  if (aoti_torch_library_impl(lib, "moe_decode", moe_decode) != AOTI_TORCH_SUCCESS) return -1;
  return aoti_torch_library_impl(lib, "moe_experts", moe_experts) == AOTI_TORCH_SUCCESS ? 0 : -1;
}
