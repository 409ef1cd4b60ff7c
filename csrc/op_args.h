// One call's arguments, decoded once: the CPU (csrc/cubecore.cpp, csrc/cpu_kernels.h) and CUDA
// (csrc/cubecore_cuda.cu) entry points turn the op's positional arguments into an OpArgs and hand only that on,
// so that the problem descriptions of both devices (Geometry, Dims) are built from one struct.  Adding a
// kernel-level option is one field here, one entry of the rule lists (decode_args and cubecore/ops/rule.py's
// Rule.op_codes / op_values, which write them) and its uses.  Defined in csrc/cubecore.cpp.
#pragma once

#include <torch/all.h>

#include <tuple>

namespace cubecore {

// The rule's options: the op's `rule` codes (cell_rule.h's) and `rule_values`, in the order of OpArgs.op_codes
// (neighbourhood, boundary, activation, output_activation, update, alive_channel, precision) and
// OpArgs.op_values (step_size, alive_threshold).  alive_channel -1 turns the alive mask off; precision is the
// update net's products' (Precision: the front chooses it from the dtype, autocast and PyTorch's switches).
struct RuleOptions {
  int64_t neighbourhood, boundary, activation, output_activation, update, alive_channel, precision;
  double step_size, alive_threshold;
};
constexpr int64_t kRuleCodes = 7, kRuleValues = 2;

// The tensors a call reads beside the state (or the trajectory), its steps and its rule.  wh, bh: the second
// hidden layer (absent with one); wo, bo: the output layer.
struct OpArgs {
  at::Tensor external;
  c10::optional<at::Tensor> perception;
  at::Tensor w1, b1;
  c10::optional<at::Tensor> wh, bh;
  at::Tensor wo, bo;
  c10::optional<at::Tensor> fire_mask, dead_state;
  int64_t steps;
  RuleOptions rule;
  bool alive() const { return rule.alive_channel >= 0; }
};

// The op's arguments after the state (forward) or after grad_final, trajectory and life (backward), as the
// schema in csrc/cubecore.cpp names them: every entry point's signature spells them with this macro, and hands
// them to decode_args with the next.
#define CUBECORE_OP_PARAMS                                                                                       \
  const at::Tensor &external, const c10::optional<at::Tensor> &perception, const at::Tensor &w1,                 \
      const at::Tensor &b1, const c10::optional<at::Tensor> &wh, const c10::optional<at::Tensor> &bh,            \
      const at::Tensor &wo, const at::Tensor &bo, const c10::optional<at::Tensor> &fire_mask,                    \
      const c10::optional<at::Tensor> &dead_state, int64_t steps, at::IntArrayRef rule,                          \
      at::ArrayRef<double> rule_values
#define CUBECORE_OP_ARGS external, perception, w1, b1, wh, bh, wo, bo, fire_mask, dead_state, steps, rule, rule_values

// Those arguments as one OpArgs; checks the rule lists' lengths and codes.
OpArgs decode_args(CUBECORE_OP_PARAMS);

// The checks every backend runs on a call (the Python front checks first, with messages for users; these guard
// direct calls of torch.ops.cubecore).
void check_propagate_args(const at::Tensor& state, const OpArgs& a);
void check_backward_args(const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& life,
                         const OpArgs& a);

// The dtypes the kernels of both devices compute in: the one place they are stated (Python reads them from the
// extension, cubecore._C.KERNEL_DTYPES).  check_kernel_dtype guards a call's state with them.
constexpr at::ScalarType kKernelDtypes[] = {at::kFloat, at::kDouble};
void check_kernel_dtype(const at::Tensor& state, const char* kernel);

// The forward op's final state and kept trajectory from the buffer its steps were written to.
std::tuple<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& written, bool keep_trajectory);

}  // namespace cubecore

