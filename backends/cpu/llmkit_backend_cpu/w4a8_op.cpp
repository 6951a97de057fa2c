// The dispatcher kernel of `llmkit_cpu::linear_w4a8(Tensor x, Tensor w, Tensor s) -> Tensor`.
//
// Registered from C++ through libtorch's stable C API (the shim of
// torch/csrc/inductor/aoti_torch/c/shim.h): a call from Python, or from a compiled decode step's
// wrapper, goes from the dispatcher straight to w4a8.c's kernel, without the way back into Python
// that an op implemented in Python takes (5-10 us a call on this plugin's AVX2 VM; a SmolLM2 step
// makes 121 of them). The schema and the fake impl are defined in w4a8.py.
//
// x [M, K] float32, w [N/8, 4K] uint8 (tiles of 8 rows), s [N/8, K/32, 2, 8] float32 (per tile and
// group: the 8 rows' scales d, then minima m), all contiguous CPU tensors; returns y [M, N]
// float32 (the formula and the layout are in w4a8.c; N is a multiple of 8).
#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>

extern "C" int llmkit_w4a8_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *sc,
                                  int64_t N8, float *y);

namespace {

// The kernel owns its input handles (the dispatcher passes each tensor as a new handle).
struct Owned {
  AtenTensorHandle handle;
  explicit Owned(StableIValue value) : handle(reinterpret_cast<AtenTensorHandle>(value)) {}
  ~Owned() { aoti_torch_delete_tensor_object(handle); }
  Owned(const Owned &) = delete;
  Owned &operator=(const Owned &) = delete;
};

void check(AOTITorchError error, const char *what) {
  if (error != AOTI_TORCH_SUCCESS) throw std::runtime_error(std::string("llmkit_cpu::linear_w4a8: ") + what + " failed");
}

// The sizes of a contiguous CPU tensor of the given dtype and rank (else a precise error).
const int64_t *expect(const Owned &t, const char *name, int32_t dtype, const char *dtype_name, int64_t rank) {
  int32_t got_dtype, device;
  int64_t dim;
  bool contiguous;
  check(aoti_torch_get_dtype(t.handle, &got_dtype), "reading a dtype");
  check(aoti_torch_get_device_type(t.handle, &device), "reading a device");
  check(aoti_torch_get_dim(t.handle, &dim), "reading a rank");
  check(aoti_torch_is_contiguous(t.handle, &contiguous), "reading a layout");
  if (got_dtype != dtype || device != aoti_torch_device_type_cpu() || dim != rank || !contiguous)
    throw std::runtime_error(std::string("llmkit_cpu::linear_w4a8: ") + name + " must be a contiguous " +
                             std::to_string(rank) + "-d CPU " + dtype_name + " tensor");
  int64_t *sizes;
  check(aoti_torch_get_sizes(t.handle, &sizes), "reading sizes");
  return sizes;
}

void *data(const Owned &t) {
  void *ptr;
  check(aoti_torch_get_data_ptr(t.handle, &ptr), "reading a data pointer");
  return ptr;
}

void linear_w4a8(StableIValue *stack, uint64_t, uint64_t) {
  const Owned x(stack[0]), w(stack[1]), s(stack[2]);
  const int64_t *xs = expect(x, "x", aoti_torch_dtype_float32(), "float32", 2);
  const int64_t *ws = expect(w, "w", aoti_torch_dtype_uint8(), "uint8", 2);
  const int64_t *ss = expect(s, "s", aoti_torch_dtype_float32(), "float32", 4);
  const int64_t M = xs[0], K = xs[1], N8 = ws[0], N = 8 * N8;
  if (K % 32 || ws[1] != 4 * K || ss[0] != N8 || ss[1] * 32 != K || ss[2] != 2 || ss[3] != 8)
    throw std::runtime_error("llmkit_cpu::linear_w4a8: shapes x [M, K], w [N/8, 4K], s [N/8, K/32, 2, 8] "
                             "with K a multiple of 32 expected, got K=" + std::to_string(K) + ", w [" +
                             std::to_string(ws[0]) + ", " + std::to_string(ws[1]) + "], s [" +
                             std::to_string(ss[0]) + ", " + std::to_string(ss[1]) + ", " +
                             std::to_string(ss[2]) + ", " + std::to_string(ss[3]) + "]");
  const int64_t sizes[2] = {M, N}, strides[2] = {N, 1};
  AtenTensorHandle y;
  check(aoti_torch_empty_strided(2, sizes, strides, aoti_torch_dtype_float32(), aoti_torch_device_type_cpu(), 0, &y),
        "allocating the output");
  void *out;
  if (aoti_torch_get_data_ptr(y, &out) != AOTI_TORCH_SUCCESS) {
    aoti_torch_delete_tensor_object(y);
    throw std::runtime_error("llmkit_cpu::linear_w4a8: reading the output's data pointer failed");
  }
  if (llmkit_w4a8_linear(static_cast<const float *>(data(x)), M, K, static_cast<const uint8_t *>(data(w)),
                         static_cast<const float *>(data(s)), N8, static_cast<float *>(out))) {
    aoti_torch_delete_tensor_object(y);
    throw std::bad_alloc();  // the activations' int8 copy
  }
  stack[0] = reinterpret_cast<StableIValue>(y);
}

}  // namespace

// Registers the CPU kernel (once: w4a8.py calls it after loading the library). 0 on success.
extern "C" int llmkit_w4a8_register(void) {
  TorchLibraryHandle lib;  // kept for the life of the process, as TORCH_LIBRARY_IMPL's would be
  if (aoti_torch_library_init_impl("llmkit_cpu", "CPU", __FILE__, __LINE__, &lib) != AOTI_TORCH_SUCCESS) return -1;
  return aoti_torch_library_impl(lib, "linear_w4a8", linear_w4a8) == AOTI_TORCH_SUCCESS ? 0 : -1;
}
