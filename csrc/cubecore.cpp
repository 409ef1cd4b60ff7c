// Op schemas and CPU kernels of the lattice propagation op.
//
// The rule (see cubecore/ops/reference.py): every cell reads its slots' states (7 or 27), through a depthwise
// perception or not, and its external input; one or two hidden layers and an output layer give its change c;
// where it fires its new state is c ("replace") or s + step_size * c ("residual"); an alive mask may reset it.  The CPU kernels (csrc/cpu_kernels.h, built here for 32-byte and, with AVX-512, also 64-byte
// vectors) work on tiles of cells and read each cell's inputs in place through a table of pointers; the update
// net runs on one of two engines (csrc/cpu_engine.h): per-cell loops that vectorise over the output features of
// every product, or tile GEMMs (oneDNN's brgemm micro-kernel through ATen) for wide hidden layers.
//
// The forward keeps the T + 1 states when asked (for the backward), and one byte per cell and step for the
// alive masks when there are any, and nothing else; the backward recomputes each step's activations from the
// saved state of that step.

#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <iterator>
#include <string>
#include <vector>

#include "cell_rule.h"
#include "cpu_engine.h"
#include "op_args.h"

extern "C" {
// The `cubecore._C` module: importing it loads this library, whose static initialisers register the op.  It
// holds one constant, the CUDA kernels' state-size limit, so that Python reads it instead of writing it again.
// cpu_engine(float32, H1): the name of the engine the CPU kernels run a call with a first hidden layer of H1
// values on (cpu_engine.h).
static PyObject* py_cpu_engine(PyObject*, PyObject* args) {
  int float32 = 0;
  long long H1 = 0;
  if (!PyArg_ParseTuple(args, "pL", &float32, &H1)) return nullptr;
  try {
    return PyUnicode_FromString(cubecore::cpu_engine_name(cubecore::cpu_engine(float32, H1)));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// tile_gemm_available(): whether the tile-GEMM engine runs on this CPU (cpu_engine.h).
static PyObject* py_tile_gemm_available(PyObject*, PyObject*) {
  return PyBool_FromLong(cubecore::tile_gemm_available());
}

// bf16_gemm_available(): whether the tile-GEMM engine runs bfloat16 products on this CPU (cpu_engine.h).
static PyObject* py_bf16_gemm_available(PyObject*, PyObject*) {
  return PyBool_FromLong(cubecore::bf16_gemm_available());
}

PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_engine", py_cpu_engine, METH_VARARGS, "The CPU kernels' engine for (float32, H1)."},
      {"tile_gemm_available", py_tile_gemm_available, METH_NOARGS, "Whether the tile-GEMM engine runs here."},
      {"bf16_gemm_available", py_bf16_gemm_available, METH_NOARGS, "Whether it runs bfloat16 products here."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // KERNEL_DTYPES: the names of kKernelDtypes as torch spells them in lower case (torch.float, torch.double).
  PyObject* dtypes = PyTuple_New(std::size(cubecore::kKernelDtypes));
  for (size_t i = 0; dtypes != nullptr && i < std::size(cubecore::kKernelDtypes); ++i) {
    std::string name = c10::toString(cubecore::kKernelDtypes[i]);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
    PyTuple_SET_ITEM(dtypes, i, PyUnicode_FromString(name.c_str()));
  }
  if (dtypes == nullptr || PyModule_AddObject(module, "KERNEL_DTYPES", dtypes) < 0) {
    Py_XDECREF(dtypes);
    Py_DECREF(module);
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "CUDA_MAX_STATE", cubecore::kMaxCudaState) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

namespace cubecore {

// The op's arguments as one OpArgs (declared in op_args.h): the rule lists checked and decoded here only.
OpArgs decode_args(CUBECORE_OP_PARAMS) {
  TORCH_CHECK(static_cast<int64_t>(rule.size()) == kRuleCodes, "rule must hold ", kRuleCodes,
              " codes (neighbourhood, boundary, activation, output_activation, update, alive_channel, precision), "
              "got ", rule.size());
  TORCH_CHECK(static_cast<int64_t>(rule_values.size()) == kRuleValues,
              "rule_values must hold (step_size, alive_threshold), got ", rule_values.size(), " values");
  const RuleOptions r{rule[0], rule[1], rule[2], rule[3], rule[4], rule[5], rule[6], rule_values[0], rule_values[1]};
  TORCH_CHECK(r.neighbourhood == kVonNeumann || r.neighbourhood == kMoore, "unknown neighbourhood code ",
              r.neighbourhood);
  TORCH_CHECK(r.boundary >= kZeros && r.boundary <= kReflect, "unknown boundary code ", r.boundary);
  TORCH_CHECK(r.activation >= kTanh && r.activation <= kSigmoid, "unknown activation code ", r.activation);
  TORCH_CHECK(r.output_activation == kOutputTanh || r.output_activation == kOutputIdentity,
              "unknown output activation code ", r.output_activation);
  TORCH_CHECK(r.update == kReplace || r.update == kResidual, "unknown update code ", r.update);
  TORCH_CHECK(r.precision >= kIeee && r.precision <= kFp16, "unknown precision code ", r.precision);
  TORCH_CHECK(steps >= 1, "steps must be >= 1, got ", steps);
  return {external, perception, w1, b1, wh, bh, wo, bo, fire_mask, dead_state, steps, r};
}

// The checks every backend runs on a call's tensors (declared in op_args.h).
void check_propagate_args(const at::Tensor& state, const OpArgs& a) {
  const at::Tensor &external = a.external, &w1 = a.w1, &b1 = a.b1, &wo = a.wo, &bo = a.bo;
  const c10::optional<at::Tensor>&perception = a.perception, &wh = a.wh, &bh = a.bh, &fire_mask = a.fire_mask,
                                  &dead_state = a.dead_state;
  TORCH_CHECK(state.dim() == 5, "state must be [B, X, Y, Z, S], got ", state.sizes());
  TORCH_CHECK(external.dim() == 5, "external must be [B, X, Y, Z, E], got ", external.sizes());
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(external.size(d) == state.size(d), "external ", external.sizes(),
                " does not match state ", state.sizes(), " in its first four dimensions");
  }
  const int64_t S = state.size(4), E = external.size(4), K = slots_of(a.rule.neighbourhood);
  if (a.rule.boundary == kReflect) {
    for (int d = 1; d < 4; ++d) TORCH_CHECK(state.size(d) >= 2, "boundary reflect needs every lattice side >= 2");
  }
  int64_t reads = K * S + E;
  if (perception) {
    TORCH_CHECK(perception->dim() == 3 && perception->size(0) == S && perception->size(2) == K &&
                    perception->size(1) >= 1,
                "perception must be [S, F, slots] = [", S, ", F, ", K, "], got ", perception->sizes());
    reads = S * perception->size(1) + E;
  }
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == reads && w1.size(0) >= 1, "w1 must be [H, ", reads, "], got ", w1.sizes());
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == w1.size(0), "b1 must be [", w1.size(0), "], got ", b1.sizes());
  TORCH_CHECK(wh.has_value() == bh.has_value(), "wh and bh come together");
  int64_t last = w1.size(0);
  if (wh) {
    TORCH_CHECK(wh->dim() == 2 && wh->size(1) == last && wh->size(0) >= 1, "wh must be [H2, ", last, "], got ",
                wh->sizes());
    TORCH_CHECK(bh->dim() == 1 && bh->size(0) == wh->size(0), "bh must be [", wh->size(0), "], got ", bh->sizes());
    last = wh->size(0);
  }
  TORCH_CHECK(wo.dim() == 2 && wo.size(0) == S && wo.size(1) == last, "wo must be [", S, ", ", last, "], got ",
              wo.sizes());
  TORCH_CHECK(bo.dim() == 1 && bo.size(0) == S, "bo must be [", S, "], got ", bo.sizes());
  std::vector<const at::Tensor*> tensors = {&external, &w1, &b1, &wo, &bo};
  for (const c10::optional<at::Tensor>* t : {&perception, &wh, &bh, &dead_state})
    if (t->has_value()) tensors.push_back(&t->value());
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->scalar_type() == state.scalar_type(), "all tensors must have the dtype of state (",
                state.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == state.device(), "all tensors must be on the device of state (", state.device(),
                "), got ", t->device());
  }
  if (fire_mask) {
    TORCH_CHECK(fire_mask->scalar_type() == at::kBool && fire_mask->dim() == 5 && fire_mask->size(0) == a.steps,
                "fire_mask must be a bool [steps, B, X, Y, Z] tensor, got ", fire_mask->sizes());
    for (int d = 0; d < 4; ++d) TORCH_CHECK(fire_mask->size(d + 1) == state.size(d), "fire_mask must be [steps, B, X, Y, Z]");
    TORCH_CHECK(fire_mask->device() == state.device(), "fire_mask must be on the device of state");
  }
  TORCH_CHECK(a.rule.alive_channel >= -1 && a.rule.alive_channel < S, "alive_channel must be -1 (off) or < S, got ",
              a.rule.alive_channel);
  if (dead_state) TORCH_CHECK(dead_state->dim() == 1 && dead_state->size(0) == S, "dead_state must be [", S, "]");
}

// The checks on the backward op's arguments (declared in op_args.h).
void check_backward_args(const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& life,
                         const OpArgs& a) {
  TORCH_CHECK(trajectory.dim() == 6 && trajectory.size(0) == a.steps + 1,
              "trajectory must be [steps + 1, B, X, Y, Z, S]; the forward must keep its trajectory");
  TORCH_CHECK(grad_final.sizes() == trajectory[0].sizes(), "grad_final must be [B, X, Y, Z, S] = ",
              trajectory[0].sizes(), ", got ", grad_final.sizes());
  TORCH_CHECK(grad_final.scalar_type() == trajectory.scalar_type() && grad_final.device() == trajectory.device(),
              "grad_final must have the dtype and device of trajectory");
  check_propagate_args(trajectory[0], a);
  if (a.alive()) {
    TORCH_CHECK(life.scalar_type() == at::kByte && life.dim() == 5 && life.size(0) == a.steps,
                "life must be the forward's [steps, B, X, Y, Z] uint8 alive masks, got ", life.sizes());
    for (int d = 0; d < 4; ++d) TORCH_CHECK(life.size(d + 1) == trajectory.size(d + 1), "life must be [steps, B, X, Y, Z]");
  }
}

// A kernel's dtype check (declared in op_args.h).
void check_kernel_dtype(const at::Tensor& state, const char* kernel) {
  for (at::ScalarType t : kKernelDtypes)
    if (state.scalar_type() == t) return;
  std::string names;
  for (at::ScalarType t : kKernelDtypes) names += std::string(names.empty() ? "" : ", ") + c10::toString(t);
  TORCH_CHECK(false, "the ", kernel, " kernel supports ", names, ", got ", state.scalar_type());
}

// The forward op's state outputs from the buffer its steps were written to
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_forward_cpu(const at::Tensor& state, CUBECORE_OP_PARAMS,
                                                                    bool keep_trajectory) {
  const auto kernel = build_for(state, w1, narrow::propagate_forward_cpu, mixed::propagate_forward_cpu,
                                wide::propagate_forward_cpu);
  return kernel(state, decode_args(CUBECORE_OP_ARGS), keep_trajectory);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
propagate_backward_cpu(const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& life,
                       CUBECORE_OP_PARAMS) {
  const auto kernel = build_for(trajectory, w1, narrow::propagate_backward_cpu, mixed::propagate_backward_cpu,
                                wide::propagate_backward_cpu);
  return kernel(grad_final, trajectory, life, decode_args(CUBECORE_OP_ARGS));
}

}  // namespace

TORCH_LIBRARY(cubecore, m) {
  // wh, bh: the second hidden layer (absent with one); wo, bo: the output layer.  rule: the codes of
  // (neighbourhood, boundary, activation, output_activation, update) as in cell_rule.h, then alive_channel (-1:
  // no alive mask); rule_values: (step_size, alive_threshold); both written by cubecore/ops/rule.py's Rule and
  // decoded by decode_args (op_args.h).  `life` holds the alive masks ([steps, B, X, Y, Z] uint8, kept with the
  // trajectory), which the backward needs.
  m.def(
      "propagate_forward(Tensor state, Tensor external, Tensor? perception, Tensor w1, Tensor b1, Tensor? wh, "
      "Tensor? bh, Tensor wo, Tensor bo, Tensor? fire_mask, Tensor? dead_state, int steps, int[] rule, "
      "float[] rule_values, bool keep_trajectory) -> (Tensor final, Tensor trajectory, Tensor life)");
  m.def(
      "propagate_backward(Tensor grad_final, Tensor trajectory, Tensor life, Tensor external, Tensor? perception, "
      "Tensor w1, Tensor b1, Tensor? wh, Tensor? bh, Tensor wo, Tensor bo, Tensor? fire_mask, Tensor? dead_state, "
      "int steps, int[] rule, float[] rule_values) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cubecore, CPU, m) {
  m.impl("propagate_forward", &propagate_forward_cpu);
  m.impl("propagate_backward", &propagate_backward_cpu);
}

}  // namespace cubecore
