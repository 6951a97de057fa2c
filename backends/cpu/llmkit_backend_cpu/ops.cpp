// The dispatcher kernels of `llmkit_cpu::linear_w4a8(Tensor x, Tensor w, Tensor s) -> Tensor`,
// `llmkit_cpu::linear_f16(Tensor x, Tensor w) -> Tensor` and `llmkit_cpu::gemv(Tensor x, Tensor w) -> Tensor`.
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
#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>

extern "C" int llmkit_w4a8_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *sc,
                                  int64_t N8, float *y);
extern "C" void llmkit_f16_linear(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N8, float *y);
extern "C" int llmkit_gemv_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y);
extern "C" int llmkit_gemv_bf16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y);
extern "C" int llmkit_gemv_bf16x(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y);

namespace {

// The kernel owns its input handles (the dispatcher passes each tensor as a new handle).
struct Owned {
  AtenTensorHandle handle;
  explicit Owned(StableIValue value) : handle(reinterpret_cast<AtenTensorHandle>(value)) {}
  ~Owned() { aoti_torch_delete_tensor_object(handle); }
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

// A new [M, N] float32 CPU tensor (the op's output).
AtenTensorHandle output(const char *op, int64_t M, int64_t N) {
  const int64_t sizes[2] = {M, N}, strides[2] = {N, 1};
  AtenTensorHandle y;
  check(aoti_torch_empty_strided(2, sizes, strides, aoti_torch_dtype_float32(), aoti_torch_device_type_cpu(), 0, &y),
        op, "allocating the output");
  return y;
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

}  // namespace

// Registers the CPU kernels (once: kernels.py calls it after loading the library). 0 on success.
extern "C" int llmkit_cpu_register(void) {
  TorchLibraryHandle lib;  // kept for the life of the process, as TORCH_LIBRARY_IMPL's would be
  if (aoti_torch_library_init_impl("llmkit_cpu", "CPU", __FILE__, __LINE__, &lib) != AOTI_TORCH_SUCCESS) return -1;
  if (aoti_torch_library_impl(lib, "linear_w4a8", linear_w4a8) != AOTI_TORCH_SUCCESS) return -1;
  if (aoti_torch_library_impl(lib, "linear_f16", linear_f16) != AOTI_TORCH_SUCCESS) return -1;
  return aoti_torch_library_impl(lib, "gemv", gemv) == AOTI_TORCH_SUCCESS ? 0 : -1;
}
