// CUDA kernels of the lattice propagation op (float32 and float64).
//
// Forward: where one sample's lattice (two state buffers, its external input) fits in shared memory and B
// blocks occupy the GPU at least as well as the per-step launches would, one block runs all T steps of one
// sample without leaving the SM; otherwise one launch per step, one thread per cell.
// Backward, per step from the last: (A) one thread per cell recomputes the step from the saved state once,
// keeping its hidden activations, the gradient at W2's pre-activation and at W1's pre-activation (in global
// scratch rows); (B) one thread per cell pulls the pre-activation gradients of the cells that read it back
// through W1 (a gather: no atomics on states); (C) one thread per (weight, chunk of cells) sums that weight's
// gradient terms over its chunk in a register and adds the sum to its own slot of a [chunks, weights] table.
// After the last step (D) sums the table over chunks in a fixed order.  No atomics anywhere: the gradients
// are the same bits on every run, and no path keeps the weight gradients in shared memory (no size limit
// but S <= kMaxState).

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

// The cell change c = tanh(W2 act(W1 x + b1) + b2) of one cell, into chg[0..S); the hidden activations
// also into hidden[0..H) where it is given (the backward keeps them).
template <typename T>
__device__ __forceinline__ void cell_change(const Dims& d, const T* const* src, const T* u, const T* w1,
                                            const T* b1, const T* w2, const T* b2, T* chg, T* hidden = nullptr) {
  for (int64_t i = 0; i < d.S; ++i) chg[i] = b2[i];
  for (int64_t j = 0; j < d.H; ++j) {
    const T h = activate(hidden_pre(d, src, u, w1, b1, j), d.activation);
    if (hidden != nullptr) hidden[j] = h;
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

int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

// The fused forward runs one block per sample; it is chosen only where one sample fits in shared memory and
// its B blocks keep at least as many SMs busy as the per-step launches would (B against the SM count): a few
// samples of a large lattice go per step, spread over the whole GPU.
template <typename T>
bool use_fused_forward(const Dims& d) {
  if (fused_shared_bytes<T>(d) > static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)))
    return false;
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  return d.B >= std::min<int64_t>(sms, blocks_for(d.N));
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
    if (use_fused_forward<scalar_t>(d)) {
      const size_t shared = fused_shared_bytes<scalar_t>(d);
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

// Pass A for one step: per cell n, recompute the step once from the saved state, keeping the hidden
// activations in hidden[n, H]; then the gradient at W2's pre-activation into dpre2[n, S] and at W1's
// pre-activation into dhidden[n, H].
template <typename T>
__global__ void backward_cell_kernel(Dims d, const T* __restrict__ state, const T* __restrict__ external,
                                     const T* __restrict__ w1, const T* __restrict__ b1, const T* __restrict__ w2,
                                     const T* __restrict__ b2, const T* __restrict__ grad_out,
                                     T* __restrict__ hidden, T* __restrict__ dpre2, T* __restrict__ dhidden) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= d.N) return;
  int64_t b, x, y, z;
  decode(d, n, &b, &x, &y, &z);
  const T* src[kSlots];
  sources(d, state + b * d.cells * d.S, x, y, z, src);
  const T* u = external + n * d.E;
  T* h = hidden + n * d.H;
  T g[kMaxState];
  cell_change(d, src, u, w1, b1, w2, b2, g, h);  // g: the change c, before it becomes c's gradient below
  const T scale = d.update == kReplace ? T(1) : static_cast<T>(d.step_size);
  for (int64_t i = 0; i < d.S; ++i) {
    g[i] = (T(1) - g[i] * g[i]) * scale * grad_out[n * d.S + i];
    dpre2[n * d.S + i] = g[i];
  }
  for (int64_t j = 0; j < d.H; ++j) {
    T dh = T(0);
    for (int64_t i = 0; i < d.S; ++i) dh += w2[i * d.H + j] * g[i];
    dhidden[n * d.H + j] = dh * activation_grad(h[j], d.activation);
  }
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
    if (slot == kSlots - 1) {
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

// The weight gradients as one flat vector [w1 (H*K) | b1 (H) | w2 (S*H) | b2 (S)].
__host__ __device__ __forceinline__ int64_t weight_count(const Dims& d) {
  return d.H * d.K + d.H + d.S * d.H + d.S;
}

// How pass C splits the cells: `chunks` chunks of `per_chunk` consecutive cells (the last may be shorter).
// Fixed by the sizes alone, so that the summation order, and with it every bit of the result, is too.
struct Chunking {
  int64_t chunks, per_chunk;
};

constexpr int64_t kCellsPerChunk = 32;         // the fewest cells a chunk sums
constexpr int64_t kMaxPartials = int64_t(1) << 22;  // entries of the [chunks, weights] table at most
constexpr int64_t kMaxGridY = 65535;

Chunking chunking(const Dims& d) {
  const int64_t cap = std::max<int64_t>(1, std::min(kMaxGridY, kMaxPartials / weight_count(d)));
  const int64_t wanted = std::min(cap, std::max<int64_t>(1, (d.N + kCellsPerChunk - 1) / kCellsPerChunk));
  const int64_t per = std::max<int64_t>(1, (d.N + wanted - 1) / wanted);
  return {(d.N + per - 1) / per, per};
}

// Pass C for one step: thread (w, chunk) sums weight w's gradient terms over its chunk of cells in a
// register and adds the sum to partial[chunk, w], a slot no other thread writes.
template <typename T>
__global__ void backward_weight_kernel(Dims d, Chunking ch, const T* __restrict__ state,
                                       const T* __restrict__ external, const T* __restrict__ hidden,
                                       const T* __restrict__ dpre2, const T* __restrict__ dhidden,
                                       T* __restrict__ partial) {
  const int64_t n_weights = weight_count(d);
  const int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (w >= n_weights) return;
  const int64_t first = blockIdx.y * ch.per_chunk;
  const int64_t last = first + ch.per_chunk < d.N ? first + ch.per_chunk : d.N;
  T acc = T(0);
  const int64_t w1_end = d.H * d.K, b1_end = w1_end + d.H, w2_end = b1_end + d.S * d.H;
  if (w < w1_end) {  // w1[j, k]: dhidden[n, j] times the input k of cell n
    const int64_t j = w / d.K, k = w % d.K;
    const int slot = static_cast<int>(k / d.S);
    for (int64_t n = first; n < last; ++n) {
      T in;
      if (slot < kSlots) {
        int64_t b, x, y, z;
        decode(d, n, &b, &x, &y, &z);
        const int64_t m = neighbour_index(x, y, z, slot, d.X, d.Y, d.Z, d.boundary);
        in = m < 0 ? T(0) : state[(b * d.cells + m) * d.S + k % d.S];
      } else {
        in = external[n * d.E + (k - kSlots * d.S)];
      }
      acc += dhidden[n * d.H + j] * in;
    }
  } else if (w < b1_end) {  // b1[j]
    const int64_t j = w - w1_end;
    for (int64_t n = first; n < last; ++n) acc += dhidden[n * d.H + j];
  } else if (w < w2_end) {  // w2[i, j]: dpre2[n, i] times hidden[n, j]
    const int64_t i = (w - b1_end) / d.H, j = (w - b1_end) % d.H;
    for (int64_t n = first; n < last; ++n) acc += dpre2[n * d.S + i] * hidden[n * d.H + j];
  } else {  // b2[i]
    const int64_t i = w - w2_end;
    for (int64_t n = first; n < last; ++n) acc += dpre2[n * d.S + i];
  }
  partial[blockIdx.y * n_weights + w] += acc;
}

// Pass D, once after the last step: each weight's gradient is its column of the table summed in chunk order.
template <typename T>
__global__ void reduce_partials_kernel(int64_t n_weights, int64_t chunks, const T* __restrict__ partial,
                                       T* __restrict__ grad_weights) {
  const int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (w >= n_weights) return;
  T acc = T(0);
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * n_weights + w];
  grad_weights[w] = acc;
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
  const int64_t n_weights = weight_count(d);
  const Chunking ch = chunking(d);
  at::Tensor grad = grad_final.contiguous().clone();
  at::Tensor grad_next = at::empty_like(grad);
  at::Tensor hidden = at::empty({d.N, d.H}, traj.options());
  at::Tensor dhidden = at::empty({d.N, d.H}, traj.options());
  at::Tensor dpre2 = at::empty({d.N, d.S}, traj.options());
  at::Tensor grad_external = at::zeros_like(u);
  at::Tensor partial = at::zeros({ch.chunks, n_weights}, traj.options());
  at::Tensor grad_weights = at::zeros({n_weights}, traj.options());
  if (d.N > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

    AT_DISPATCH_FLOATING_TYPES(traj.scalar_type(), "propagate_backward_cuda", [&] {
      const dim3 weight_grid(blocks_for(n_weights), static_cast<unsigned int>(ch.chunks));
      for (int64_t t = steps - 1; t >= 0; --t) {
        const scalar_t* s_t = traj[t].data_ptr<scalar_t>();
        backward_cell_kernel<scalar_t><<<blocks_for(d.N), kThreads, 0, stream>>>(
            d, s_t, u.data_ptr<scalar_t>(), W1.data_ptr<scalar_t>(), B1.data_ptr<scalar_t>(),
            W2.data_ptr<scalar_t>(), B2.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), hidden.data_ptr<scalar_t>(),
            dpre2.data_ptr<scalar_t>(), dhidden.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        backward_gather_kernel<scalar_t><<<blocks_for(d.N), kThreads, 0, stream>>>(
            d, W1.data_ptr<scalar_t>(), dhidden.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
            grad_next.data_ptr<scalar_t>(), grad_external.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        backward_weight_kernel<scalar_t><<<weight_grid, kThreads, 0, stream>>>(
            d, ch, s_t, u.data_ptr<scalar_t>(), hidden.data_ptr<scalar_t>(), dpre2.data_ptr<scalar_t>(),
            dhidden.data_ptr<scalar_t>(), partial.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        std::swap(grad, grad_next);
      }
      reduce_partials_kernel<scalar_t><<<blocks_for(n_weights), kThreads, 0, stream>>>(
          n_weights, ch.chunks, partial.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
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
