// CUDA kernels of the lattice propagation op (float32 and float64), in two sets behind one op.
//
// The fast kernels (compiled for (S, H) in with_fast_sizes) keep the weights in shared memory and a cell's
// vectors in registers; the general kernels take every other size.  Both: the forward runs all T steps of
// one sample in one block where its lattice fits in shared memory and B blocks occupy the GPU at least as
// well as per-step launches would, else one launch per step, one thread per cell.
// General backward, per step from the last: (A) one thread per cell recomputes the step from the saved state
// once, keeping its hidden activations, the gradient at W2's pre-activation and at W1's pre-activation (in
// global scratch rows); (B) one thread per cell pulls the pre-activation gradients of the cells that read it
// back through W1 (a gather: no atomics on states); (C) one thread per (weight, chunk of cells) sums that
// weight's gradient terms over its chunk in a register and adds the sum to its own slot of a [chunks,
// weights] table.  The fast backward fuses A and C per block (see the fast kernels' section) into a
// [blocks, weights] table.  After the last step (D) sums the table in a fixed order.  No atomics anywhere:
// the gradients are the same bits on every run of a given GPU (the tables' shapes follow its SM count and
// shared memory), and the general path keeps no weight gradient in shared memory (no size limit but
// S <= kMaxState).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cell_rule.h"
#include "op_args.h"

namespace cubecore {



namespace {

constexpr int kMaxState = kMaxCudaState;  // a cell's state change lives in a per-thread array
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
#pragma unroll
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

// The fused forward's output for this block's sample after step t (t = -1: the initial state): trajectory
// entry t + 1 when the trajectory is kept, else only the final state, into entry 0.
template <typename T>
__device__ __forceinline__ void save_fused_step(const Dims& d, int64_t t, int64_t steps, bool keep, const T* state,
                                                T* trajectory) {
  if (!keep && t != steps - 1) return;
  const int64_t per_sample = d.cells * d.S;
  T* dst = trajectory + (keep ? (t + 1) * d.B * per_sample : 0) + blockIdx.x * per_sample;
  for (int64_t i = threadIdx.x; i < per_sample; i += blockDim.x) dst[i] = state[i];
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
    save_fused_step(d, t, steps, keep, next, trajectory);
  }
  if (keep) save_fused_step(d, -1, steps, keep, state + blockIdx.x * d.cells * d.S, trajectory);
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

unsigned int blocks_of(int64_t n, int64_t threads) { return static_cast<unsigned int>((n + threads - 1) / threads); }
unsigned int blocks_for(int64_t n) { return blocks_of(n, kThreads); }

// The fused forward runs one block per sample; it is chosen only where one sample fits in shared memory and
// its B blocks keep at least as many SMs busy as the per-step launches would (B against the SM count): a few
// samples of a large lattice go per step, spread over the whole GPU.
// (`extra`: more shared bytes the kernel takes, the weights for the fast one.)
template <typename T>
bool use_fused_forward(const Dims& d, size_t extra = 0) {
  if (fused_shared_bytes<T>(d) + extra > static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)))
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

// The dH rows (H values each, in dhidden) of the cells that read cell n = (b; x, y, z) through `slot`:
// readers[0] its neighbour's (nullptr: none; slot 6: its own), readers[1] its own where it reads itself
// through a reflecting edge (else nullptr).
template <typename T>
__device__ __forceinline__ void slot_readers(const Dims& d, int64_t n, int64_t b, int64_t x, int64_t y, int64_t z,
                                             int slot, const T* dhidden, int64_t H, const T** readers) {
  const T* own = dhidden + n * H;
  readers[0] = readers[1] = nullptr;
  if (slot == kSlots - 1) {
    readers[0] = own;
    return;
  }
  const int axis = slot / 2;
  const int64_t coord = axis == 0 ? x : axis == 1 ? y : z, extent = axis == 0 ? d.X : axis == 1 ? d.Y : d.Z;
  int64_t other;
  bool self;
  readers_through_slot(coord, (slot & 1) ? 1 : -1, extent, d.boundary, &other, &self);
  if (other >= 0) {
    const int64_t cx = axis == 0 ? other : x, cy = axis == 1 ? other : y, cz = axis == 2 ? other : z;
    readers[0] = dhidden + (b * d.cells + (cx * d.Y + cy) * d.Z + cz) * H;
  }
  if (self) readers[1] = own;
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
  const T* own = dhidden + n * d.H;
  T acc[kMaxState];
  for (int64_t c = 0; c < d.S; ++c) {
    acc[c] = d.update == kResidual ? grad_out[n * d.S + c] : T(0);
  }
  for (int slot = 0; slot < kSlots; ++slot) {
    const T* readers[2];
    slot_readers(d, n, b, x, y, z, slot, dhidden, d.H, readers);
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

// ---- the fast kernels: compile-time S and H, weights on chip ----------------------------------------------
//
// For the common sizes (with_fast_sizes) the kernels below are compiled with S and H fixed: a cell's hidden
// pre-activations, its state change and the source row being read live in registers (every loop over S or
// H unrolls, so no array goes to local memory), and each block first copies the weights into shared memory,
// where every thread of a warp reads the same weight at once (a broadcast).  Other sizes take the general
// kernels above.  CUBECORE_CUDA_KERNELS=general forces those everywhere (for tests and comparisons).
//
// Backward: pass A and pass C become one kernel.  A block takes tiles of blockDim.x cells in turn; per tile
// each thread recomputes its cell's step in registers and leaves the cell's inputs, hidden activations and
// the two pre-activation gradients in shared-memory rows; then thread w sums weight w's terms over the
// tile's cells (w, w + blockDim.x, ...) and adds the sum to partial[block, w], a slot no other block writes.
// Pass D sums the [blocks, weights] table in block order.  No atomics: the same bits on every run.

// W1's rows in shared memory are padded to a multiple of 4 values, so that with S a multiple of 4 every
// slot's weights start on a 16-byte boundary and load as whole 16-byte vectors (one load per 4 products in
// float32, per 2 in float64).
__host__ __device__ __forceinline__ int64_t w1_stride(const Dims& d) { return (d.K + 3) / 4 * 4; }

// Values the weights take in shared memory: [w1 (H x w1_stride) | b1 (H) | w2 (S x H) | b2 (S)].
__host__ __device__ __forceinline__ int64_t shared_weight_count(const Dims& d) {
  return d.H * w1_stride(d) + d.H + d.S * d.H + d.S;
}

template <typename T>
struct SharedWeights {
  const T *w1, *b1, *w2, *b2;
  int64_t stride;  // of w1's rows
};

// Copies W1 into `smem` with padded rows (all threads of the block take part; no barrier).
template <typename T>
__device__ __forceinline__ void stage_w1(const Dims& d, T* smem, const T* w1) {
  const int64_t stride = w1_stride(d);
  for (int64_t i = threadIdx.x; i < d.H * stride; i += blockDim.x) {
    const int64_t j = i / stride, k = i - j * stride;
    smem[i] = k < d.K ? w1[j * d.K + k] : T(0);
  }
}

// Copies the weights into `smem` (all threads of the block take part; a barrier follows).
template <typename T>
__device__ __forceinline__ SharedWeights<T> stage_weights(const Dims& d, T* smem, const T* w1, const T* b1,
                                                          const T* w2, const T* b2) {
  const int64_t hk = d.H * w1_stride(d), sh = d.S * d.H;
  stage_w1(d, smem, w1);
  for (int64_t i = threadIdx.x; i < d.H; i += blockDim.x) smem[hk + i] = b1[i];
  for (int64_t i = threadIdx.x; i < sh; i += blockDim.x) smem[hk + d.H + i] = w2[i];
  for (int64_t i = threadIdx.x; i < d.S; i += blockDim.x) smem[hk + d.H + sh + i] = b2[i];
  __syncthreads();
  return {smem, smem + hk, smem + hk + d.H, smem + hk + d.H + sh, w1_stride(d)};
}

// 16 bytes of consecutive values: the unit in which the fast kernels read weights from shared memory.
template <typename T>
struct alignas(16) Pack {
  static constexpr int n = 16 / sizeof(T);
  T v[n];
};

// sum over c < S of w[c] * x[c], w 16-byte aligned, reading w in 16-byte packs.
template <int S, typename T>
__device__ __forceinline__ T dot_packed(const T* w, const T (&x)[S], T acc) {
  constexpr int P = Pack<T>::n;
  static_assert(S % P == 0, "the fast sizes have S a multiple of 4");
#pragma unroll
  for (int c = 0; c < S; c += P) {
    const Pack<T> q = *reinterpret_cast<const Pack<T>*>(w + c);
#pragma unroll
    for (int i = 0; i < P; ++i) acc += q.v[i] * x[c + i];
  }
  return acc;
}

// The change c = tanh(W2 act(W1 x + b1) + b2) of one cell, with S and H fixed: src(slot) is the row the cell
// reads through the slot (nullptr: zeros), u its external input; hid gets the hidden activations.
template <int S, int H, typename T, class Rows>
__device__ __forceinline__ void cell_change_fast(const Dims& d, const SharedWeights<T>& w, Rows&& src,
                                                 const T* u, T (&chg)[S], T (&hid)[H]) {
  const int64_t K = w.stride;
  T pre[H];
#pragma unroll
  for (int j = 0; j < H; ++j) pre[j] = w.b1[j];
#pragma unroll 1  // one slot at a time: the registers hold one source row, not seven
  for (int slot = 0; slot < kSlots; ++slot) {
    const T* p = src(slot);
    if (p == nullptr) continue;
    T x[S];
#pragma unroll
    for (int c = 0; c < S; ++c) x[c] = p[c];
#pragma unroll
    for (int j = 0; j < H; ++j) pre[j] = dot_packed(w.w1 + j * K + slot * S, x, pre[j]);
  }
  for (int64_t e = 0; e < d.E; ++e) {
    const T x = u[e];
#pragma unroll
    for (int j = 0; j < H; ++j) pre[j] += w.w1[j * K + kSlots * S + e] * x;
  }
#pragma unroll
  for (int i = 0; i < S; ++i) chg[i] = w.b2[i];
#pragma unroll
  for (int j = 0; j < H; ++j) {
    hid[j] = activate(pre[j], d.activation);
#pragma unroll
    for (int i = 0; i < S; ++i) chg[i] += w.w2[i * H + j] * hid[j];
  }
#pragma unroll
  for (int i = 0; i < S; ++i) chg[i] = tanh(chg[i]);
}

// The rows that cell (x, y, z) of a sample whose states start at `sample` reads, slot by slot.
template <int S, typename T>
__device__ __forceinline__ auto neighbour_rows(const Dims& d, const T* sample, int64_t x, int64_t y, int64_t z) {
  return [=, &d](int slot) -> const T* {
    const int64_t m = neighbour_index(x, y, z, slot, d.X, d.Y, d.Z, d.boundary);
    return m < 0 ? nullptr : sample + m * S;
  };
}

template <int S, typename T>
__device__ __forceinline__ void store_step(const Dims& d, const T (&chg)[S], const T* cur, T* next) {
  const T step = static_cast<T>(d.step_size);
#pragma unroll
  for (int i = 0; i < S; ++i) next[i] = d.update == kReplace ? chg[i] : cur[i] + step * chg[i];
}

template <typename T, int S, int H>
__global__ void __launch_bounds__(kThreads) forward_step_fast_kernel(
    Dims d, const T* __restrict__ state, const T* __restrict__ external, const T* __restrict__ w1,
    const T* __restrict__ b1, const T* __restrict__ w2, const T* __restrict__ b2, T* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const SharedWeights<T> w = stage_weights(d, reinterpret_cast<T*>(smem_raw), w1, b1, w2, b2);
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= d.N) return;
  int64_t b, x, y, z;
  decode(d, n, &b, &x, &y, &z);
  T chg[S], hid[H];
  cell_change_fast(d, w, neighbour_rows<S>(d, state + b * d.cells * S, x, y, z), external + n * d.E, chg, hid);
  store_step(d, chg, state + n * S, out + n * S);
}

// All T steps of one sample in one block, as forward_fused_kernel, with the weights in shared memory too.
template <typename T, int S, int H>
__global__ void __launch_bounds__(kThreads) forward_fused_fast_kernel(
    Dims d, int64_t steps, bool keep, const T* __restrict__ state, const T* __restrict__ external,
    const T* __restrict__ w1, const T* __restrict__ b1, const T* __restrict__ w2, const T* __restrict__ b2,
    T* __restrict__ trajectory) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t per_sample = d.cells * S;
  T* const even = smem + shared_weight_count(d);  // the states of steps 0, 2, 4, ...
  T* const odd = even + per_sample;                // and of steps 1, 3, 5, ... (selected, not indexed: registers)
  T* ext = odd + per_sample;
  const int64_t b = blockIdx.x;
  for (int64_t i = threadIdx.x; i < per_sample; i += blockDim.x) even[i] = state[b * per_sample + i];
  for (int64_t i = threadIdx.x; i < d.cells * d.E; i += blockDim.x) ext[i] = external[b * d.cells * d.E + i];
  const SharedWeights<T> w = stage_weights(d, smem, w1, b1, w2, b2);  // its barrier covers the copies above
  for (int64_t t = 0; t < steps; ++t) {
    const T* cur = (t & 1) ? odd : even;
    T* next = (t & 1) ? even : odd;
    for (int64_t cell = threadIdx.x; cell < d.cells; cell += blockDim.x) {
      const int64_t z = cell % d.Z, y = (cell / d.Z) % d.Y, x = cell / (d.Y * d.Z);
      T chg[S], hid[H];
      cell_change_fast(d, w, neighbour_rows<S>(d, cur, x, y, z), ext + cell * d.E, chg, hid);
      store_step(d, chg, cur + cell * S, next + cell * S);
    }
    __syncthreads();
    save_fused_step(d, t, steps, keep, next, trajectory);
  }
  if (keep) save_fused_step(d, -1, steps, keep, state + blockIdx.x * d.cells * d.S, trajectory);
}

// The shared-memory rows of one tile of the fast backward, per cell: its inputs (K, padded to an odd
// length so that rows of neighbouring threads fall in different banks), hidden activations (H), and the
// gradients at W2's (S) and W1's (H) pre-activations.
__host__ __device__ __forceinline__ int64_t input_row(const Dims& d) { return d.K | 1; }
__host__ __device__ __forceinline__ int64_t tile_row(const Dims& d) { return input_row(d) + 2 * d.H + d.S; }

// Passes A and C of one step, fused (see above).  dhidden[n, H] is left for the gather.
template <typename T, int S, int H>
__global__ void __launch_bounds__(kThreads) backward_cell_weights_fast_kernel(
    Dims d, const T* __restrict__ state, const T* __restrict__ external, const T* __restrict__ w1,
    const T* __restrict__ b1, const T* __restrict__ w2, const T* __restrict__ b2, const T* __restrict__ grad_out,
    T* __restrict__ dhidden, T* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t n_weights = weight_count(d), K = d.K, Kp = input_row(d), C = blockDim.x;
  T* in_rows = smem + shared_weight_count(d);  // [C][Kp]
  T* hid_rows = in_rows + C * Kp;  // [C][H]
  T* dpre2_rows = hid_rows + C * H;  // [C][S]
  T* dh_rows = dpre2_rows + C * S;   // [C][H]
  const SharedWeights<T> w = stage_weights(d, smem, w1, b1, w2, b2);
  const T scale = d.update == kReplace ? T(1) : static_cast<T>(d.step_size);
  const int64_t tiles = (d.N + C - 1) / C, c = threadIdx.x;
  T* in = in_rows + c * Kp;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t n = tile * C + c;
    T hid[H], dpre2[S];
    if (n < d.N) {
      int64_t b, x, y, z;
      decode(d, n, &b, &x, &y, &z);
      const T* sample = state + b * d.cells * S;
#pragma unroll 1
      for (int slot = 0; slot < kSlots; ++slot) {
        const int64_t m = neighbour_index(x, y, z, slot, d.X, d.Y, d.Z, d.boundary);
#pragma unroll
        for (int i = 0; i < S; ++i) in[slot * S + i] = m < 0 ? T(0) : sample[m * S + i];
      }
      for (int64_t e = 0; e < d.E; ++e) in[kSlots * S + e] = external[n * d.E + e];
      T chg[S];
      cell_change_fast(d, w, [in](int slot) -> const T* { return in + slot * S; }, in + kSlots * S, chg, hid);
#pragma unroll
      for (int i = 0; i < S; ++i) dpre2[i] = (T(1) - chg[i] * chg[i]) * scale * grad_out[n * S + i];
    } else {  // past the last cell: rows of zeros add nothing to the sums
      for (int64_t k = 0; k < K; ++k) in[k] = T(0);
#pragma unroll
      for (int j = 0; j < H; ++j) hid[j] = T(0);
#pragma unroll
      for (int i = 0; i < S; ++i) dpre2[i] = T(0);
    }
#pragma unroll
    for (int i = 0; i < S; ++i) dpre2_rows[c * S + i] = dpre2[i];
#pragma unroll
    for (int j = 0; j < H; ++j) {
      T dh = T(0);
#pragma unroll
      for (int i = 0; i < S; ++i) dh += w.w2[i * H + j] * dpre2[i];
      dh *= activation_grad(hid[j], d.activation);
      hid_rows[c * H + j] = hid[j];
      dh_rows[c * H + j] = dh;
      if (n < d.N) dhidden[n * H + j] = dh;
    }
    __syncthreads();
    // Thread c sums weights c, c + C, ... over the tile's cells: consecutive threads read consecutive inputs
    // (or hidden activations) of one cell, and all read the same gradient (a broadcast).
    const int64_t w1_end = H * K, b1_end = w1_end + H, w2_end = b1_end + S * H;
    for (int64_t wi = c; wi < n_weights; wi += C) {
      T acc = T(0);
      if (wi < w1_end) {
        const int64_t j = wi / K, k = wi % K;
        for (int64_t r = 0; r < C; ++r) acc += dh_rows[r * H + j] * in_rows[r * Kp + k];
      } else if (wi < b1_end) {
        for (int64_t r = 0; r < C; ++r) acc += dh_rows[r * H + (wi - w1_end)];
      } else if (wi < w2_end) {
        const int64_t i = (wi - b1_end) / H, j = (wi - b1_end) % H;
        for (int64_t r = 0; r < C; ++r) acc += dpre2_rows[r * S + i] * hid_rows[r * H + j];
      } else {
        for (int64_t r = 0; r < C; ++r) acc += dpre2_rows[r * S + (wi - w2_end)];
      }
      partial[blockIdx.x * n_weights + wi] += acc;
    }
    __syncthreads();  // the rows are rewritten by the next tile
  }
}

// Pass B with S and H fixed and W1 in shared memory: the state gradient of each cell, pulled from the cells
// that read it, and the external input's gradient.
template <typename T, int S, int H>
__global__ void __launch_bounds__(kThreads) backward_gather_fast_kernel(
    Dims d, const T* __restrict__ w1, const T* __restrict__ dhidden, const T* __restrict__ grad_out,
    T* __restrict__ grad_in, T* __restrict__ grad_external) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* w1s = reinterpret_cast<T*>(smem_raw);
  const int64_t K = w1_stride(d);
  stage_w1(d, w1s, w1);
  __syncthreads();
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= d.N) return;
  int64_t b, x, y, z;
  decode(d, n, &b, &x, &y, &z);
  const T* own = dhidden + n * H;
  T acc[S];
#pragma unroll
  for (int c = 0; c < S; ++c) acc[c] = d.update == kResidual ? grad_out[n * S + c] : T(0);
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    const T* readers[2];
    slot_readers(d, n, b, x, y, z, slot, dhidden, H, readers);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const T* dh = readers[r];
      if (dh == nullptr) continue;
#pragma unroll
      for (int j = 0; j < H; ++j) {
        const T v = dh[j];
        const T* ws = w1s + j * K + slot * S;
        constexpr int P = Pack<T>::n;
#pragma unroll
        for (int c = 0; c < S; c += P) {
          const Pack<T> q = *reinterpret_cast<const Pack<T>*>(ws + c);
#pragma unroll
          for (int i = 0; i < P; ++i) acc[c + i] += q.v[i] * v;
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < S; ++c) grad_in[n * S + c] = acc[c];
  for (int64_t e = 0; e < d.E; ++e) {
    T g = T(0);
#pragma unroll
    for (int j = 0; j < H; ++j) g += w1s[j * K + kSlots * S + e] * own[j];
    grad_external[n * d.E + e] += g;
  }
}

// The sizes compiled with S and H fixed: the original core (8, 16), the training default (8, 32) and the
// larger state (16, 64).  f(S, H) as integral constants; false where the sizes are not among them, or the
// general kernels are forced.
template <class F>
bool with_fast_sizes(const Dims& d, F&& f) {
  const char* forced = std::getenv("CUBECORE_CUDA_KERNELS");
  if (forced != nullptr && std::string(forced) == "general") return false;
  using std::integral_constant;
  if (d.S == 8 && d.H == 16) return f(integral_constant<int, 8>{}, integral_constant<int, 16>{});
  if (d.S == 8 && d.H == 32) return f(integral_constant<int, 8>{}, integral_constant<int, 32>{});
  if (d.S == 16 && d.H == 64) return f(integral_constant<int, 16>{}, integral_constant<int, 64>{});
  return false;
}

constexpr size_t kDefaultShared = 48 * 1024;  // dynamic shared memory per block without the opt-in attribute

// Shared memory a kernel may take: the opt-in limit, or the default where that is lower.
size_t shared_limit() {
  return std::max<size_t>(kDefaultShared, device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

// Lets `kernel` take `bytes` of dynamic shared memory (past the default, the opt-in attribute says so).
template <class Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultShared)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Threads per block (a multiple of 32, at most `most`) for one thread per cell over n cells: as many as
// leave every SM at least one block, so that a few thousand cells spread over the whole GPU rather than
// filling a few SMs.
int64_t threads_to_fill(int64_t n, int64_t most) {
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  return std::max<int64_t>(32, std::min<int64_t>(most, n / sms / 32 * 32));
}


// The forward's pointers, as the kernels take them.
template <typename T>
struct ForwardArgs {
  const T *state, *external, *w1, *b1, *w2, *b2;
  T *trajectory, *spare;  // spare: the second state buffer when the trajectory is not kept
};

// Launches one forward with either set of kernels: all T steps of each sample in one block (fused_kernel,
// with `extra_shared` bytes of weights beside the states) where use_fused_forward says so, else step_kernel
// once per step over blocks of `step_threads` cells (with `extra_shared` bytes each).  Returns whether it
// ran fused: the fused kernels write trajectory entry 0 themselves.
template <typename T, class FusedKernel, class StepKernel>
bool launch_forward(const Dims& d, int64_t steps, bool keep, const ForwardArgs<T>& a, size_t extra_shared,
                    FusedKernel fused_kernel, StepKernel step_kernel, int64_t step_threads, cudaStream_t stream) {
  if (use_fused_forward<T>(d, extra_shared)) {
    const size_t shared = extra_shared + fused_shared_bytes<T>(d);
    allow_shared(fused_kernel, shared);
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, ((d.cells + 31) / 32) * 32));
    fused_kernel<<<static_cast<unsigned int>(d.B), threads, shared, stream>>>(
        d, steps, keep, a.state, a.external, a.w1, a.b1, a.w2, a.b2, a.trajectory);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
  allow_shared(step_kernel, extra_shared);
  const T* cur = a.state;
  for (int64_t t = 0; t < steps; ++t) {
    T* next = step_destination(a.trajectory, a.spare, d.N * d.S, t, steps, keep);
    step_kernel<<<blocks_of(d.N, step_threads), static_cast<unsigned int>(step_threads), extra_shared, stream>>>(
        d, cur, a.external, a.w1, a.b1, a.w2, a.b2, next);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cur = next;
  }
  return false;
}

// Threads per block of the fast backward: the most (a multiple of 32, at most kThreads) whose tile rows fit
// in shared memory beside the weights; 0 if not even 32 do.
template <typename T>
int64_t fast_backward_threads(const Dims& d) {
  const int64_t limit = static_cast<int64_t>(shared_limit() / sizeof(T)) - shared_weight_count(d);
  const int64_t threads = std::min<int64_t>(kThreads, limit / tile_row(d) / 32 * 32);
  return threads >= 32 ? threads_to_fill(d.N, threads) : 0;
}

// Blocks of the fast backward: at most four per SM (or CUBECORE_CUDA_BACKWARD_BLOCKS, which lets the tests
// give a block several tiles on a small lattice), each taking tiles in turn, so that the table of block
// partials stays small whatever the lattice.
int64_t fast_backward_blocks(const Dims& d, int64_t threads) {
  const int64_t tiles = (d.N + threads - 1) / threads;
  const char* cap = std::getenv("CUBECORE_CUDA_BACKWARD_BLOCKS");
  const int64_t most = cap != nullptr && std::atoll(cap) > 0 ? std::atoll(cap)
                                                              : 4 * device_attribute(cudaDevAttrMultiProcessorCount);
  return std::min<int64_t>(tiles, most);
}

// ---- the ops ----------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> propagate_forward_cuda(
    const at::Tensor& state, const at::Tensor& external, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, int64_t steps, int64_t boundary, int64_t activation,
    int64_t update, double step_size, bool keep_trajectory) {
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
    using T = scalar_t;
    at::Tensor spare = keep_trajectory ? at::Tensor() : at::empty_like(s0);
    const ForwardArgs<T> a{s0.data_ptr<T>(), u.data_ptr<T>(), W1.data_ptr<T>(), B1.data_ptr<T>(), W2.data_ptr<T>(),
                           B2.data_ptr<T>(), traj.data_ptr<T>(), keep_trajectory ? nullptr : spare.data_ptr<T>()};
    bool fused = false;
    const bool fast = with_fast_sizes(d, [&](auto s_, auto h_) {
      constexpr int S = decltype(s_)::value, H = decltype(h_)::value;
      const size_t weights = sizeof(T) * shared_weight_count(d);
      if (weights > shared_limit()) return false;
      fused = launch_forward(d, steps, keep_trajectory, a, weights, forward_fused_fast_kernel<T, S, H>,
                             forward_step_fast_kernel<T, S, H>, threads_to_fill(d.N, kThreads), stream);
      return true;
    });
    if (!fast) {
      fused = launch_forward(d, steps, keep_trajectory, a, 0, forward_fused_kernel<T>, forward_step_kernel<T>,
                             kThreads, stream);
    }
    if (!fused && keep_trajectory) traj[0].copy_(s0);  // the fused kernels write it themselves
  });
  return forward_outputs(traj, keep_trajectory);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_backward_cuda(
    const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& external,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t steps,
    int64_t boundary, int64_t activation, int64_t update, double step_size) {
  check_cuda(trajectory[0]);
  const c10::cuda::CUDAGuard guard(trajectory.device());
  const at::Tensor traj = trajectory.contiguous(), u = external.contiguous();
  const at::Tensor W1 = w1.contiguous(), B1 = b1.contiguous(), W2 = w2.contiguous(), B2 = b2.contiguous();
  const Dims d = make_dims(traj[0], u, W1, boundary, activation, update, step_size);
  const int64_t n_weights = weight_count(d);
  at::Tensor grad = grad_final.contiguous().clone();
  at::Tensor grad_next = at::empty_like(grad);
  at::Tensor dhidden = at::empty({d.N, d.H}, traj.options());
  at::Tensor grad_external = at::zeros_like(u);
  at::Tensor grad_weights = at::zeros({n_weights}, traj.options());
  if (d.N > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

    AT_DISPATCH_FLOATING_TYPES(traj.scalar_type(), "propagate_backward_cuda", [&] {
      using T = scalar_t;
      const T *ext = u.data_ptr<T>(), *w1p = W1.data_ptr<T>(), *b1p = B1.data_ptr<T>(), *w2p = W2.data_ptr<T>(),
              *b2p = B2.data_ptr<T>();
      auto reduce = [&](const at::Tensor& partial) {
        reduce_partials_kernel<T><<<blocks_for(n_weights), kThreads, 0, stream>>>(
            n_weights, partial.size(0), partial.data_ptr<T>(), grad_weights.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      const bool fast = with_fast_sizes(d, [&](auto s_, auto h_) {
        constexpr int S = decltype(s_)::value, H = decltype(h_)::value;
        const int64_t threads = fast_backward_threads<T>(d);
        const size_t gather_bytes = sizeof(T) * d.H * w1_stride(d);
        if (threads == 0 || gather_bytes > shared_limit()) return false;
        const int64_t blocks = fast_backward_blocks(d, threads);
        const int64_t gather_threads = threads_to_fill(d.N, kThreads);
        const size_t cell_bytes = sizeof(T) * (shared_weight_count(d) + threads * tile_row(d));
        auto cell_kernel = backward_cell_weights_fast_kernel<T, S, H>;
        auto gather_kernel = backward_gather_fast_kernel<T, S, H>;
        allow_shared(cell_kernel, cell_bytes);
        allow_shared(gather_kernel, gather_bytes);
        at::Tensor partial = at::zeros({blocks, n_weights}, traj.options());
        for (int64_t t = steps - 1; t >= 0; --t) {
          cell_kernel<<<static_cast<unsigned int>(blocks), static_cast<unsigned int>(threads), cell_bytes, stream>>>(
              d, traj[t].data_ptr<T>(), ext, w1p, b1p, w2p, b2p, grad.data_ptr<T>(), dhidden.data_ptr<T>(),
              partial.data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          gather_kernel<<<blocks_of(d.N, gather_threads), static_cast<unsigned int>(gather_threads), gather_bytes,
                          stream>>>(
              d, w1p, dhidden.data_ptr<T>(), grad.data_ptr<T>(), grad_next.data_ptr<T>(), grad_external.data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          std::swap(grad, grad_next);
        }
        reduce(partial);
        return true;
      });
      if (fast) return;
      const Chunking ch = chunking(d);
      at::Tensor hidden = at::empty({d.N, d.H}, traj.options());
      at::Tensor dpre2 = at::empty({d.N, d.S}, traj.options());
      at::Tensor partial = at::zeros({ch.chunks, n_weights}, traj.options());
      const dim3 weight_grid(blocks_for(n_weights), static_cast<unsigned int>(ch.chunks));
      for (int64_t t = steps - 1; t >= 0; --t) {
        const T* s_t = traj[t].data_ptr<T>();
        backward_cell_kernel<T><<<blocks_for(d.N), kThreads, 0, stream>>>(
            d, s_t, ext, w1p, b1p, w2p, b2p, grad.data_ptr<T>(), hidden.data_ptr<T>(), dpre2.data_ptr<T>(),
            dhidden.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        backward_gather_kernel<T><<<blocks_for(d.N), kThreads, 0, stream>>>(
            d, w1p, dhidden.data_ptr<T>(), grad.data_ptr<T>(), grad_next.data_ptr<T>(), grad_external.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        backward_weight_kernel<T><<<weight_grid, kThreads, 0, stream>>>(
            d, ch, s_t, ext, hidden.data_ptr<T>(), dpre2.data_ptr<T>(), dhidden.data_ptr<T>(), partial.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        std::swap(grad, grad_next);
      }
      reduce(partial);
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

// The CUDA kernels run the original rule of the family: von Neumann, concat perception, one hidden layer, a tanh
// output, no fire or alive masks, zeros/circular/replicate boundaries (cubecore.ops.front.CUDA_RULE says so to
// users, and sends other rules to the reference).
void check_cuda_rule(const c10::optional<at::Tensor>& perception, const c10::optional<at::Tensor>& wh,
                     const c10::optional<at::Tensor>& fire_mask, int64_t neighbourhood, int64_t boundary,
                     int64_t output_activation, int64_t alive_channel) {
  TORCH_CHECK(!perception && !wh && !fire_mask && neighbourhood == kVonNeumann && boundary != kReflect &&
                  output_activation == kOutputTanh && alive_channel < 0,
              "the CUDA kernel runs von_neumann neighbourhoods with concat perception, one hidden layer, a tanh "
              "output, zeros/circular/replicate boundaries, no fire or alive masks");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_forward_rule_cuda(
    const at::Tensor& state, const at::Tensor& external, const c10::optional<at::Tensor>& perception,
    const at::Tensor& w1, const at::Tensor& b1, const c10::optional<at::Tensor>& wh,
    const c10::optional<at::Tensor>& bh, const at::Tensor& wo, const at::Tensor& bo,
    const c10::optional<at::Tensor>& fire_mask, const c10::optional<at::Tensor>& dead_state, int64_t steps,
    int64_t neighbourhood, int64_t boundary, int64_t activation, int64_t output_activation, int64_t update,
    double step_size, int64_t alive_channel, double alive_threshold, bool keep_trajectory) {
  check_propagate_args(state, external, perception, w1, b1, wh, bh, wo, bo, fire_mask, dead_state, steps,
                       neighbourhood, boundary, activation, output_activation, update, alive_channel);
  check_cuda_rule(perception, wh, fire_mask, neighbourhood, boundary, output_activation, alive_channel);
  auto [final_state, trajectory] =
      propagate_forward_cuda(state, external, w1, b1, wo, bo, steps, boundary, activation, update, step_size,
                             keep_trajectory);
  return {final_state, trajectory, at::empty({0, state.size(0), state.size(1), state.size(2), state.size(3)},
                                             state.options().dtype(at::kByte))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
propagate_backward_rule_cuda(const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& life,
                             const at::Tensor& external, const c10::optional<at::Tensor>& perception,
                             const at::Tensor& w1, const at::Tensor& b1, const c10::optional<at::Tensor>& wh,
                             const c10::optional<at::Tensor>& bh, const at::Tensor& wo, const at::Tensor& bo,
                             const c10::optional<at::Tensor>& fire_mask, const c10::optional<at::Tensor>& dead_state,
                             int64_t steps, int64_t neighbourhood, int64_t boundary, int64_t activation,
                             int64_t output_activation, int64_t update, double step_size, int64_t alive_channel) {
  check_backward_args(grad_final, trajectory, life, external, perception, w1, b1, wh, bh, wo, bo, fire_mask,
                      dead_state, steps, neighbourhood, boundary, activation, output_activation, update,
                      alive_channel);
  check_cuda_rule(perception, wh, fire_mask, neighbourhood, boundary, output_activation, alive_channel);
  auto [gs, ge, gw1, gb1, gwo, gbo] = propagate_backward_cuda(grad_final, trajectory, external, w1, b1, wo, bo,
                                                              steps, boundary, activation, update, step_size);
  const at::Tensor none = at::empty({0}, trajectory.options());
  return {gs, ge, none, gw1, gb1, none, none, gwo, gbo};
}

}  // namespace

TORCH_LIBRARY_IMPL(cubecore, CUDA, m) {
  m.impl("propagate_forward", &propagate_forward_rule_cuda);
  m.impl("propagate_backward", &propagate_backward_rule_cuda);
}

}  // namespace cubecore
