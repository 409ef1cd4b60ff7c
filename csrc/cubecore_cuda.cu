// CUDA kernels of the lattice propagation op (float32 and float64).
//
// Forward: where one sample's lattice (two state buffers, its external input and the weights) fits in shared
// memory, one block runs all T steps of that sample without leaving the SM; otherwise one launch per step,
// one thread per cell.  Backward, per step from the last: (A) one thread per cell recomputes the step from
// the saved state, pushes the gradient through tanh, W2 and act, keeps the pre-activation gradient, and adds
// its weight-gradient terms, reduced across the warp with shuffles, then across the block in shared memory,
// then once per block into global memory; (B) one thread per cell pulls the pre-activation gradients of the
// cells that read it back through W1 (a gather: no atomics on states).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>
#include <torch/library.h>

#include "cell_rule.h"

namespace cubecore {

void check_propagate_args(const at::Tensor& state, const at::Tensor& external, const at::Tensor& w1,
                          const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t steps,
                          int64_t boundary, int64_t activation, int64_t update);
void check_backward_args(const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& external,
                         const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                         int64_t steps, int64_t boundary, int64_t activation, int64_t update);
std::tuple<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& written, bool keep_trajectory);

namespace {

constexpr int kMaxState = 64;  // a cell's state change lives in a per-thread array (ops.CUDA_MAX_STATE)
constexpr int kThreads = 256;

struct Dims {
  int64_t B, X, Y, Z, S, E, H, K, cells, N;
  int64_t boundary, activation, update;
  double step_size;
};

template <typename T>
__device__ __forceinline__ T activate(T v, int64_t activation) {
  if (activation == kTanh) return tanh(v);
  if (activation == kRelu) return v > T(0) ? v : T(0);
  return T(1) / (T(1) + exp(-v));
}

// d act / d pre-activation, from the activation's output a.
template <typename T>
__device__ __forceinline__ T activation_grad(T a, int64_t activation) {
  if (activation == kTanh) return T(1) - a * a;
  if (activation == kRelu) return a > T(0) ? T(1) : T(0);
  return a * (T(1) - a);
}

__device__ __forceinline__ void decode(const Dims& d, int64_t n, int64_t* b, int64_t* x, int64_t* y, int64_t* z) {
  int64_t rest = n;
  *z = rest % d.Z;
  rest /= d.Z;
  *y = rest % d.Y;
  rest /= d.Y;
  *x = rest % d.X;
  *b = rest / d.X;
}

// Pre-activation of hidden unit j of the cell whose seven source rows are `src` (nullptr: zeros).
template <typename T>
__device__ __forceinline__ T hidden_pre(const Dims& d, const T* const* src, const T* u, const T* w1, const T* b1,
                                        int64_t j) {
  const T* wr = w1 + j * d.K;
  T a = b1[j];
  for (int slot = 0; slot < kSlots; ++slot) {
    const T* p = src[slot];
    if (p == nullptr) continue;
    const T* ws = wr + slot * d.S;
    for (int64_t c = 0; c < d.S; ++c) a += ws[c] * p[c];
  }
  const T* we = wr + kSlots * d.S;
  for (int64_t e = 0; e < d.E; ++e) a += we[e] * u[e];
  return a;
}

// The cell change c = tanh(W2 act(W1 x + b1) + b2) of one cell, into chg[0..S).
template <typename T>
__device__ __forceinline__ void cell_change(const Dims& d, const T* const* src, const T* u, const T* w1,
                                            const T* b1, const T* w2, const T* b2, T* chg) {
  for (int64_t i = 0; i < d.S; ++i) chg[i] = b2[i];
  for (int64_t j = 0; j < d.H; ++j) {
    const T h = activate(hidden_pre(d, src, u, w1, b1, j), d.activation);
    for (int64_t i = 0; i < d.S; ++i) chg[i] += w2[i * d.H + j] * h;
  }
  for (int64_t i = 0; i < d.S; ++i) chg[i] = tanh(chg[i]);
}

// Source rows of cell (x, y, z) of a sample whose states start at `sample`.
template <typename T>
__device__ __forceinline__ void sources(const Dims& d, const T* sample, int64_t x, int64_t y, int64_t z,
                                        const T** src) {
  for (int slot = 0; slot < kSlots; ++slot) {
    const int64_t m = neighbour_index(x, y, z, slot, d.X, d.Y, d.Z, d.boundary);
    src[slot] = m < 0 ? nullptr : sample + m * d.S;
  }
}

// ---- forward ---------------------------------------------------------------------------------------------

template <typename T>
__global__ void forward_step_kernel(Dims d, const T* __restrict__ state, const T* __restrict__ external,
                                    const T* __restrict__ w1, const T* __restrict__ b1, const T* __restrict__ w2,
                                    const T* __restrict__ b2, T* __restrict__ out) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= d.N) return;
  int64_t b, x, y, z;
  decode(d, n, &b, &x, &y, &z);
  const T* src[kSlots];
  sources(d, state + b * d.cells * d.S, x, y, z, src);
  T chg[kMaxState];
  cell_change(d, src, external + n * d.E, w1, b1, w2, b2, chg);
  const T step = static_cast<T>(d.step_size);
  for (int64_t i = 0; i < d.S; ++i)
    out[n * d.S + i] = d.update == kReplace ? chg[i] : state[n * d.S + i] + step * chg[i];
}

// All T steps of one sample in one block: states ping-pong between two shared-memory buffers.
// trajectory: [T + 1, B, cells, S] when keep, else [1, B, cells, S] (the final state only).
template <typename T>
__global__ void forward_fused_kernel(Dims d, int64_t steps, bool keep, const T* __restrict__ state,
                                     const T* __restrict__ external, const T* __restrict__ w1,
                                     const T* __restrict__ b1, const T* __restrict__ w2, const T* __restrict__ b2,
                                     T* __restrict__ trajectory) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t per_sample = d.cells * d.S;
  T* buf[2] = {smem, smem + per_sample};
  T* ext = smem + 2 * per_sample;
  const int64_t b = blockIdx.x;
  for (int64_t i = threadIdx.x; i < per_sample; i += blockDim.x) buf[0][i] = state[b * per_sample + i];
  for (int64_t i = threadIdx.x; i < d.cells * d.E; i += blockDim.x) ext[i] = external[b * d.cells * d.E + i];
  __syncthreads();
  const T step = static_cast<T>(d.step_size);
  const int64_t sample_stride = d.B * per_sample;  // one trajectory entry
  for (int64_t t = 0; t < steps; ++t) {
    const T* cur = buf[t & 1];
    T* next = buf[(t + 1) & 1];
    for (int64_t cell = threadIdx.x; cell < d.cells; cell += blockDim.x) {
      const int64_t z = cell % d.Z, y = (cell / d.Z) % d.Y, x = cell / (d.Y * d.Z);
      const T* src[kSlots];
      sources(d, cur, x, y, z, src);
      T chg[kMaxState];
      cell_change(d, src, ext + cell * d.E, w1, b1, w2, b2, chg);
      for (int64_t i = 0; i < d.S; ++i)
        next[cell * d.S + i] = d.update == kReplace ? chg[i] : cur[cell * d.S + i] + step * chg[i];
    }
    __syncthreads();
    if (keep || t == steps - 1) {
      T* dst = trajectory + (keep ? (t + 1) * sample_stride : 0) + b * per_sample;
      for (int64_t i = threadIdx.x; i < per_sample; i += blockDim.x) dst[i] = next[i];
    }
  }
  if (keep) {
    for (int64_t i = threadIdx.x; i < per_sample; i += blockDim.x) trajectory[b * per_sample + i] = state[b * per_sample + i];
  }
}

template <typename T>
size_t fused_shared_bytes(const Dims& d) {
  return sizeof(T) * static_cast<size_t>(2 * d.cells * d.S + d.cells * d.E);
}

int max_shared_bytes() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

Dims make_dims(const at::Tensor& state, const at::Tensor& external, const at::Tensor& w1, int64_t boundary,
               int64_t activation, int64_t update, double step_size) {
  Dims d;
  d.B = state.size(0);
  d.X = state.size(1);
  d.Y = state.size(2);
  d.Z = state.size(3);
  d.S = state.size(4);
  d.E = external.size(4);
  d.H = w1.size(0);
  d.K = w1.size(1);
  d.cells = d.X * d.Y * d.Z;
  d.N = d.B * d.cells;
  d.boundary = boundary;
  d.activation = activation;
  d.update = update;
  d.step_size = step_size;
  return d;
}

void check_cuda(const at::Tensor& state) {
  TORCH_CHECK(state.is_cuda(), "the CUDA kernel needs CUDA tensors");
  TORCH_CHECK(state.size(4) <= kMaxState, "the CUDA kernel supports state size S <= ", kMaxState, ", got ",
              state.size(4));
  TORCH_CHECK(state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble,
              "the CUDA kernel supports float32 and float64, got ", state.scalar_type());
}

unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

std::tuple<at::Tensor, at::Tensor> propagate_forward_cuda(
    const at::Tensor& state, const at::Tensor& external, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, int64_t steps, int64_t boundary, int64_t activation,
    int64_t update, double step_size, bool keep_trajectory) {
  check_propagate_args(state, external, w1, b1, w2, b2, steps, boundary, activation, update);
  check_cuda(state);
  const c10::cuda::CUDAGuard guard(state.device());
  const at::Tensor s0 = state.contiguous(), u = external.contiguous();
  const at::Tensor W1 = w1.contiguous(), B1 = b1.contiguous(), W2 = w2.contiguous(), B2 = b2.contiguous();
  const Dims d = make_dims(s0, u, W1, boundary, activation, update, step_size);
  std::vector<int64_t> shape = {keep_trajectory ? steps + 1 : 1};
  for (int64_t v : s0.sizes()) shape.push_back(v);
  at::Tensor traj = at::empty(shape, s0.options());
  if (d.N == 0) return forward_outputs(traj, keep_trajectory);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(s0.scalar_type(), "propagate_forward_cuda", [&] {
    const size_t shared = fused_shared_bytes<scalar_t>(d);
    if (shared <= static_cast<size_t>(max_shared_bytes())) {
      auto kernel = forward_fused_kernel<scalar_t>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
      const int threads = static_cast<int>(std::min<int64_t>(kThreads, ((d.cells + 31) / 32) * 32));
      kernel<<<static_cast<unsigned int>(d.B), threads, shared, stream>>>(
          d, steps, keep_trajectory, s0.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), W1.data_ptr<scalar_t>(),
          B1.data_ptr<scalar_t>(), W2.data_ptr<scalar_t>(), B2.data_ptr<scalar_t>(), traj.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor spare = keep_trajectory ? at::Tensor() : at::empty_like(s0);
    const scalar_t* cur = s0.data_ptr<scalar_t>();
    scalar_t* spare_p = keep_trajectory ? nullptr : spare.data_ptr<scalar_t>();
    for (int64_t t = 0; t < steps; ++t) {
      scalar_t* next = step_destination(traj.data_ptr<scalar_t>(), spare_p, s0.numel(), t, steps, keep_trajectory);
      forward_step_kernel<scalar_t><<<blocks_for(d.N), kThreads, 0, stream>>>(
          d, cur, u.data_ptr<scalar_t>(), W1.data_ptr<scalar_t>(), B1.data_ptr<scalar_t>(), W2.data_ptr<scalar_t>(),
          B2.data_ptr<scalar_t>(), next);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cur = next;
    }
    if (keep_trajectory) traj[0].copy_(s0);
  });
  return forward_outputs(traj, keep_trajectory);
}

// ---- backward --------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Adds v (one value per thread) into block_acc[index]: summed over the warp first, then one shared-memory
// add per warp.
template <typename T>
__device__ __forceinline__ void block_accumulate(T* block_acc, int64_t index, T v) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) atomicAdd(block_acc + index, v);
}

// Pass A for one step: per cell, d loss / d pre-activation into dhidden [N, H]; weight-gradient terms into
// grad_weights = [w1 (H*K) | b1 (H) | w2 (S*H) | b2 (S)], via a per-block shared accumulator.
template <typename T>
__global__ void backward_cell_kernel(Dims d, const T* __restrict__ state, const T* __restrict__ external,
                                     const T* __restrict__ w1, const T* __restrict__ b1, const T* __restrict__ w2,
                                     const T* __restrict__ b2, const T* __restrict__ grad_out,
                                     T* __restrict__ dhidden, T* __restrict__ grad_weights) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* block_acc = reinterpret_cast<T*>(smem_raw);
  const int64_t n_weights = d.H * d.K + d.H + d.S * d.H + d.S;
  for (int64_t i = threadIdx.x; i < n_weights; i += blockDim.x) block_acc[i] = T(0);
  __syncthreads();
  T* acc_w1 = block_acc;
  T* acc_b1 = acc_w1 + d.H * d.K;
  T* acc_w2 = acc_b1 + d.H;
  T* acc_b2 = acc_w2 + d.S * d.H;

  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool active = n < d.N;  // inactive threads still take part in the warp reductions, with zeros
  const int64_t nn = active ? n : 0;
  int64_t b, x, y, z;
  decode(d, nn, &b, &x, &y, &z);
  const T* src[kSlots];
  sources(d, state + b * d.cells * d.S, x, y, z, src);
  const T* u = external + nn * d.E;
  T dchg[kMaxState];
  cell_change(d, src, u, w1, b1, w2, b2, dchg);
  const T scale = d.update == kReplace ? T(1) : static_cast<T>(d.step_size);
  for (int64_t i = 0; i < d.S; ++i) {
    const T g = active ? grad_out[nn * d.S + i] : T(0);
    dchg[i] = (T(1) - dchg[i] * dchg[i]) * scale * g;
    block_accumulate(acc_b2, i, dchg[i]);
  }
  for (int64_t j = 0; j < d.H; ++j) {
    const T h = activate(hidden_pre(d, src, u, w1, b1, j), d.activation);
    T dh = T(0);
    for (int64_t i = 0; i < d.S; ++i) {
      dh += w2[i * d.H + j] * dchg[i];
      block_accumulate(acc_w2, i * d.H + j, dchg[i] * h);
    }
    dh *= activation_grad(h, d.activation);
    if (active) dhidden[nn * d.H + j] = dh;
    block_accumulate(acc_b1, j, dh);
    T* row = acc_w1 + j * d.K;
    for (int slot = 0; slot < kSlots; ++slot) {
      const T* p = src[slot];
      for (int64_t c = 0; c < d.S; ++c) block_accumulate(row, slot * d.S + c, p ? dh * p[c] : T(0));
    }
    for (int64_t e = 0; e < d.E; ++e) block_accumulate(row, kSlots * d.S + e, dh * u[e]);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n_weights; i += blockDim.x) atomicAdd(grad_weights + i, block_acc[i]);
}

// Pass B for one step: per cell, the state gradient pulled from the cells that read it, plus the residual
// path; and the external input's gradient.
template <typename T>
__global__ void backward_gather_kernel(Dims d, const T* __restrict__ w1, const T* __restrict__ dhidden,
                                       const T* __restrict__ grad_out,
                                       T* __restrict__ grad_in, T* __restrict__ grad_external) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= d.N) return;
  int64_t b, x, y, z;
  decode(d, n, &b, &x, &y, &z);
  const int64_t coord[3] = {x, y, z};
  const int64_t extent[3] = {d.X, d.Y, d.Z};
  const T* own = dhidden + n * d.H;
  T acc[kMaxState];
  for (int64_t c = 0; c < d.S; ++c) {
    acc[c] = d.update == kResidual ? grad_out[n * d.S + c] : T(0);
  }
  for (int slot = 0; slot < kSlots; ++slot) {
    const T* readers[2] = {nullptr, nullptr};
    if (slot == 6) {
      readers[0] = own;
    } else {
      const int axis = slot / 2;
      int64_t other;
      bool self;
      readers_through_slot(coord[axis], (slot & 1) ? 1 : -1, extent[axis], d.boundary, &other, &self);
      if (other >= 0) {
        int64_t c3[3] = {x, y, z};
        c3[axis] = other;
        readers[0] = dhidden + (b * d.cells + (c3[0] * d.Y + c3[1]) * d.Z + c3[2]) * d.H;
      }
      if (self) readers[1] = own;
    }
    for (int r = 0; r < 2; ++r) {
      const T* dh = readers[r];
      if (dh == nullptr) continue;
      for (int64_t j = 0; j < d.H; ++j) {
        const T* ws = w1 + j * d.K + slot * d.S;
        const T v = dh[j];
        for (int64_t c = 0; c < d.S; ++c) acc[c] += ws[c] * v;
      }
    }
  }
  for (int64_t c = 0; c < d.S; ++c) grad_in[n * d.S + c] = acc[c];
  for (int64_t e = 0; e < d.E; ++e) {
    T g = T(0);
    for (int64_t j = 0; j < d.H; ++j) g += w1[j * d.K + kSlots * d.S + e] * own[j];
    grad_external[n * d.E + e] += g;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_backward_cuda(
    const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& external,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t steps,
    int64_t boundary, int64_t activation, int64_t update, double step_size) {
  check_backward_args(grad_final, trajectory, external, w1, b1, w2, b2, steps, boundary, activation, update);
  check_cuda(trajectory[0]);
  const c10::cuda::CUDAGuard guard(trajectory.device());
  const at::Tensor traj = trajectory.contiguous(), u = external.contiguous();
  const at::Tensor W1 = w1.contiguous(), B1 = b1.contiguous(), W2 = w2.contiguous(), B2 = b2.contiguous();
  const Dims d = make_dims(traj[0], u, W1, boundary, activation, update, step_size);
  const int64_t n_weights = d.H * d.K + d.H + d.S * d.H + d.S;
  at::Tensor grad = grad_final.contiguous().clone();
  at::Tensor grad_next = at::empty_like(grad);
  at::Tensor dhidden = at::empty({d.N, d.H}, traj.options());
  at::Tensor grad_external = at::zeros_like(u);
  at::Tensor grad_weights = at::zeros({n_weights}, traj.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(traj.scalar_type(), "propagate_backward_cuda", [&] {
    const size_t shared = sizeof(scalar_t) * static_cast<size_t>(n_weights);
    TORCH_CHECK(shared <= static_cast<size_t>(max_shared_bytes()),
                "the CUDA backward keeps the weight gradients of a block in shared memory; ", shared,
                " bytes do not fit: use a smaller hidden or state size, or the reference backend");
    auto cell_kernel = backward_cell_kernel<scalar_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(cell_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
    for (int64_t t = steps - 1; t >= 0 && d.N > 0; --t) {
      cell_kernel<<<blocks_for(d.N), kThreads, shared, stream>>>(
          d, traj[t].data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), W1.data_ptr<scalar_t>(), B1.data_ptr<scalar_t>(),
          W2.data_ptr<scalar_t>(), B2.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), dhidden.data_ptr<scalar_t>(),
          grad_weights.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_gather_kernel<scalar_t><<<blocks_for(d.N), kThreads, 0, stream>>>(
          d, W1.data_ptr<scalar_t>(), dhidden.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
          grad_next.data_ptr<scalar_t>(), grad_external.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::swap(grad, grad_next);
    }
  });
  int64_t off = 0;
  at::Tensor grad_w1 = grad_weights.narrow(0, off, d.H * d.K).view({d.H, d.K});
  off += d.H * d.K;
  at::Tensor grad_b1 = grad_weights.narrow(0, off, d.H);
  off += d.H;
  at::Tensor grad_w2 = grad_weights.narrow(0, off, d.S * d.H).view({d.S, d.H});
  off += d.S * d.H;
  at::Tensor grad_b2 = grad_weights.narrow(0, off, d.S);
  return {grad, grad_external, grad_w1.clone(), grad_b1.clone(), grad_w2.clone(), grad_b2.clone()};
}

}  // namespace

TORCH_LIBRARY_IMPL(cubecore, CUDA, m) {
  m.impl("propagate_forward", &propagate_forward_cuda);
  m.impl("propagate_backward", &propagate_backward_cuda);
}

}  // namespace cubecore
