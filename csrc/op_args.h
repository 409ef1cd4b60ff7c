// Declarations shared by the CPU (csrc/cubecore.cpp) and CUDA (csrc/cubecore_cuda.cu) sides of the op: the
// checks every backend runs on its arguments, and the forward's outputs.  Defined in csrc/cubecore.cpp.
#pragma once

#include <torch/all.h>

#include <tuple>

namespace cubecore {

void check_propagate_args(const at::Tensor& state, const at::Tensor& external,
                          const c10::optional<at::Tensor>& perception, const at::Tensor& w1, const at::Tensor& b1,
                          const c10::optional<at::Tensor>& wh, const c10::optional<at::Tensor>& bh,
                          const at::Tensor& wo, const at::Tensor& bo, const c10::optional<at::Tensor>& fire_mask,
                          const c10::optional<at::Tensor>& dead_state, int64_t steps, int64_t neighbourhood,
                          int64_t boundary, int64_t activation, int64_t output_activation, int64_t update,
                          int64_t alive_channel);

void check_backward_args(const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& life,
                         const at::Tensor& external, const c10::optional<at::Tensor>& perception,
                         const at::Tensor& w1, const at::Tensor& b1, const c10::optional<at::Tensor>& wh,
                         const c10::optional<at::Tensor>& bh, const at::Tensor& wo, const at::Tensor& bo,
                         const c10::optional<at::Tensor>& fire_mask, const c10::optional<at::Tensor>& dead_state,
                         int64_t steps, int64_t neighbourhood, int64_t boundary, int64_t activation,
                         int64_t output_activation, int64_t update, int64_t alive_channel);

// The forward op's final state and kept trajectory from the buffer its steps were written to.
std::tuple<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& written, bool keep_trajectory);

}  // namespace cubecore
