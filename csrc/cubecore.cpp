// Op schemas and CPU kernels of the lattice propagation op.
//
// The rule (see cubecore/reference.py): every cell gathers x = [n1..n6, s, u] (7S + E values), computes
// h = act(W1 x + b1), c = tanh(W2 h + b2), and its new state is c ("replace") or s + step_size * c
// ("residual").  The CPU kernels (csrc/cpu_kernels.h, built here for 32-byte and, with AVX-512, also 64-byte
// vectors) work on tiles of cells, read each cell's inputs in place through a table of pointers, and
// vectorise over the output features of every matrix product.
//
// The forward keeps the T + 1 states when asked (for the backward) and nothing else; the backward
// recomputes each step's hidden activations from the saved state of that step (and, with update="residual",
// its change; with "replace" the change is the next saved state).

#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cell_rule.h"

extern "C" {
// The `cubecore._C` module: importing it loads this library, whose static initialisers register the op.  It
// holds one constant, the CUDA kernels' state-size limit, so that Python reads it instead of writing it again.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "CUDA_MAX_STATE", cubecore::kMaxCudaState) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

namespace cubecore {

// Shared with the CUDA file: the checks every backend runs on the op's arguments.
void check_propagate_args(const at::Tensor& state, const at::Tensor& external, const at::Tensor& w1,
                          const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t steps,
                          int64_t boundary, int64_t activation, int64_t update) {
  TORCH_CHECK(state.dim() == 5, "state must be [B, X, Y, Z, S], got ", state.sizes());
  TORCH_CHECK(external.dim() == 5, "external must be [B, X, Y, Z, E], got ", external.sizes());
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(external.size(d) == state.size(d), "external ", external.sizes(),
                " does not match state ", state.sizes(), " in its first four dimensions");
  }
  const int64_t S = state.size(4), E = external.size(4);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == inputs_per_cell(S, E), "w1 must be [H, 7*S+E] = [H, ", inputs_per_cell(S, E), "], got ",
              w1.sizes());
  const int64_t H = w1.size(0);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == H, "b1 must be [H] = [", H, "], got ", b1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == S && w2.size(1) == H, "w2 must be [S, H] = [", S, ", ", H,
              "], got ", w2.sizes());
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == S, "b2 must be [S] = [", S, "], got ", b2.sizes());
  for (const at::Tensor* t : {&external, &w1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->scalar_type() == state.scalar_type(), "all tensors must have the dtype of state (",
                state.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == state.device(), "all tensors must be on the device of state (", state.device(),
                "), got ", t->device());
  }
  TORCH_CHECK(steps >= 1, "steps must be >= 1, got ", steps);
  TORCH_CHECK(boundary >= kWall && boundary <= kReflect, "unknown boundary code ", boundary);
  TORCH_CHECK(activation >= kTanh && activation <= kSigmoid, "unknown activation code ", activation);
  TORCH_CHECK(update == kReplace || update == kResidual, "unknown update code ", update);
}

// Shared with the CUDA file: the checks on the backward op's arguments.
void check_backward_args(const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& external,
                         const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                         int64_t steps, int64_t boundary, int64_t activation, int64_t update) {
  TORCH_CHECK(trajectory.dim() == 6 && trajectory.size(0) == steps + 1,
              "trajectory must be [steps + 1, B, X, Y, Z, S]; the forward must keep its trajectory");
  TORCH_CHECK(grad_final.sizes() == trajectory[0].sizes(), "grad_final must be [B, X, Y, Z, S] = ",
              trajectory[0].sizes(), ", got ", grad_final.sizes());
  TORCH_CHECK(grad_final.scalar_type() == trajectory.scalar_type() && grad_final.device() == trajectory.device(),
              "grad_final must have the dtype and device of trajectory");
  check_propagate_args(trajectory[0], external, w1, b1, w2, b2, steps, boundary, activation, update);
}

// Shared with the CUDA file: the forward op's two outputs from the buffer its steps were written to
// ([steps + 1, ...] when the trajectory is kept, else [1, ...]): the final state, and the kept trajectory
// (else an empty [0, B, X, Y, Z, S]).  Two outputs, so that autograd hands the backward the final state's
// gradient alone instead of a zero-filled one for every step; the final state is a copy where the trajectory
// is returned too, as outputs must not alias.
std::tuple<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& written, bool keep_trajectory) {
  if (keep_trajectory) return {written[written.size(0) - 1].clone(), written};
  std::vector<int64_t> none = written.sizes().vec();
  none[0] = 0;
  return {written[0], at::empty(none, written.options())};
}

// The CPU kernels, compiled for 32-byte vectors (AVX2) and, where the machine has AVX-512, twice more: with
// 64-byte vectors over the hidden features and 32-byte ones over a state (`mixed`), and with 64-byte vectors
// throughout (`wide`).  A call takes the widest vectors its sizes fill: `wide` where a state is whole 64-byte
// vectors (S a multiple of 16: measured +35% at S = 16, H = 64), `mixed` where the hidden layer has more than
// 8 values and S is not a multiple of 16 (S = 8, H = 16: a state stays whole 32-byte vectors), else `narrow`.
namespace narrow {
#define CUBECORE_HIDDEN_BYTES 32
#define CUBECORE_STATE_BYTES 32
#include "cpu_kernels.h"
#undef CUBECORE_HIDDEN_BYTES
#undef CUBECORE_STATE_BYTES
}  // namespace narrow

#ifdef __AVX512F__
namespace mixed {
#define CUBECORE_HIDDEN_BYTES 64
#define CUBECORE_STATE_BYTES 32
#include "cpu_kernels.h"
#undef CUBECORE_HIDDEN_BYTES
#undef CUBECORE_STATE_BYTES
}  // namespace mixed

namespace wide {
#define CUBECORE_HIDDEN_BYTES 64
#define CUBECORE_STATE_BYTES 64
#include "cpu_kernels.h"
#undef CUBECORE_HIDDEN_BYTES
#undef CUBECORE_STATE_BYTES
}  // namespace wide
#else
// Without AVX-512 the 32-byte build is the only one; the others' names stand for it (build_for never picks
// them there), so that every call names all three.
namespace mixed = narrow;
namespace wide = narrow;
#endif

namespace {

// The function of the build a call takes (see above), from its state size S (the last dimension of `states`)
// and hidden size H (the rows of w1).  Malformed tensors take `narrow`, whose argument checks name them.
template <class F>
F* build_for(const at::Tensor& states, const at::Tensor& w1, F* narrow_fn, [[maybe_unused]] F* mixed_fn,
             [[maybe_unused]] F* wide_fn) {
#ifdef __AVX512F__
  if (states.dim() >= 1 && w1.dim() == 2) {
    if (states.size(-1) % 16 == 0) return wide_fn;
    if (w1.size(0) > 8) return mixed_fn;
  }
#endif
  return narrow_fn;
}

std::tuple<at::Tensor, at::Tensor> propagate_forward_cpu(
    const at::Tensor& state, const at::Tensor& external, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, int64_t steps, int64_t boundary, int64_t activation,
    int64_t update, double step_size, bool keep_trajectory) {
  const auto kernel = build_for(state, w1, narrow::propagate_forward_cpu, mixed::propagate_forward_cpu,
                                wide::propagate_forward_cpu);
  return kernel(state, external, w1, b1, w2, b2, steps, boundary, activation, update, step_size, keep_trajectory);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_backward_cpu(
    const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& external,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t steps,
    int64_t boundary, int64_t activation, int64_t update, double step_size) {
  const auto kernel = build_for(trajectory, w1, narrow::propagate_backward_cpu, mixed::propagate_backward_cpu,
                                wide::propagate_backward_cpu);
  return kernel(grad_final, trajectory, external, w1, b1, w2, b2, steps, boundary, activation, update, step_size);
}

}  // namespace

TORCH_LIBRARY(cubecore, m) {
  m.def(
      "propagate_forward(Tensor state, Tensor external, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "int steps, int boundary, int activation, int update, float step_size, bool keep_trajectory) "
      "-> (Tensor final, Tensor trajectory)");
  m.def(
      "propagate_backward(Tensor grad_final, Tensor trajectory, Tensor external, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2, int steps, int boundary, int activation, int update, float step_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cubecore, CPU, m) {
  m.impl("propagate_forward", &propagate_forward_cpu);
  m.impl("propagate_backward", &propagate_backward_cpu);
}

}  // namespace cubecore
