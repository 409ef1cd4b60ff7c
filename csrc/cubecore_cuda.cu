// CUDA kernels of the lattice propagation op (float32 and float64): the whole rule family (see
// cubecore/ops/reference.py and csrc/cpu_kernels.h) in one kernel family.
//
// Every kernel is a template over the state size L, compiled for the common sizes (with_cuda_state_length:
// S = 8, 16, 20) and once with L = 0 for every other size, as the CPU kernels' with_state_length does.  A
// thread works on one cell at a time; the vectors of its cell (perception, hidden activations, change, and in
// the backward their gradients) live in a row of its own ("scratch row"), in shared memory where a block's
// rows fit, else in a global buffer (the same code: a row is a pointer).  Weights are read from global memory:
// every thread of a warp reads the same weight at once (a broadcast from L1).
//
// Forward: all T steps of one sample in one block where its states, input and rows fit in shared memory and B
// blocks keep the GPU at least as busy as per-step launches would (forward_fused_kernel); else one launch per
// step, one thread per cell (forward_step_kernel), and with alive masks two more per step (alive_kernel: the
// mask from the states before and after; bury_kernel: dead cells take the dead state).  Fire masks come in as
// bytes ([T][N]); the alive masks go out as bytes ([T][N], kept with the trajectory for the backward).
//
// Backward, per step from the last, in the passes docs/kernels.md names for both devices: recompute, change
// gradient, hidden gradient and input gradient in backward_tile_kernel: a block takes tiles of blockDim.x cells
// in turn; per tile each thread recomputes its cell's step in its row, pushes the upstream gradient back to the
// first layer (the change, the hidden layers, the perception), adds the external input's gradient, leaves
// what its readers need (W1's input gradient dH1, or the perception's gradient) in a global [N] buffer; then,
// after a barrier, thread w sums weight w's terms over the tile's rows in a register and adds the sum to
// partial[block, w], a slot no other block writes.  State gradient in backward_gather_kernel: one thread per
// cell pulls its state gradient from the cells that read it (a gather: no atomics on states; the CPU scatters
// instead).  Weight gradient sum after the last step: reduce_partials_kernel sums the [blocks, weights] table
// in block order.  No atomics anywhere: the
// gradients are the same bits on every run of a given GPU (the table's shape follows its SM count and
// shared memory), whatever order threads, warps and blocks run in.
//
// Where the call's precision is tf32, bfloat16 or float16 (float32 inputs, sm_80 and later), the update net's
// products run on tensor cores instead (WMMA; the section "tensor cores" below): tc_forward_step_kernel per step,
// tc_backward_tile_kernel in place of backward_tile_kernel, the gather and the sum as above.
//
// The choices (compile-time size or not, fused or per-step forward, rows in shared or global memory, threads
// and blocks, the tensor-core tile) are made once per call from the sizes and the device;
// cubecore_cuda_force_paths (a test hook, a plain C function) overrides them.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cell_rule.h"
#include "op_args.h"

namespace cubecore {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256;

// What cubecore_cuda_force_paths sets (tests); zeros: the choices the sizes make.
struct ForcedPaths {
  int runtime_sizes = 0;        // 1: the L = 0 kernels for every size
  int global_rows = 0;          // 1: scratch rows in global memory even where they fit in shared memory
  int forward = 0;              // 0: as the sizes choose; 1: per step; 2: fused wherever it fits
  int64_t backward_blocks = 0;  // > 0: at most this many blocks in the backward and in the tensor-core forward
  int tensor_cores = 0;         // 0: as the precision chooses; 1: the FMA path whatever the precision
  int tile = 0;                 // 16, 32 or 64: the tensor-core path's cells per tile (0: the largest that fits)
  int sm = 0;                   // > 0: the device's compute capability (10 * major + minor) as the checks see it
};
ForcedPaths forced_paths;

// The problem of one call: sizes and the rule's codes.
struct Dims {
  int64_t B, X, Y, Z, S, E, K, F, H1, H2, In, SI, cells, N;
  RuleOptions rule;  // the rule's codes and values (op_args.h)
  int64_t stride;  // values of a scratch row (odd, so that rows of neighbouring threads fall in other banks)
};

// A scratch row: [perception SF | h1 H1 | h2 H2 | change S | dh2 H2 | dh1 H1 | dperception SF]; the change's
// slot takes its gradient in the backward.  Offsets:
__host__ __device__ __forceinline__ int64_t row_h1(const Dims& d) { return d.S * d.F; }
__host__ __device__ __forceinline__ int64_t row_h2(const Dims& d) { return row_h1(d) + d.H1; }
__host__ __device__ __forceinline__ int64_t row_change(const Dims& d) { return row_h2(d) + d.H2; }
__host__ __device__ __forceinline__ int64_t row_dh2(const Dims& d) { return row_change(d) + d.S; }
__host__ __device__ __forceinline__ int64_t row_dh1(const Dims& d) { return row_dh2(d) + d.H2; }
__host__ __device__ __forceinline__ int64_t row_dperception(const Dims& d) { return row_dh1(d) + d.H1; }
__host__ __device__ __forceinline__ int64_t row_length(const Dims& d) { return row_dperception(d) + d.S * d.F; }

// The weights, as the op takes them: perception [S][F][K] (nullptr: concat), w1 [H1][In], b1, wh [H2][H1] and
// bh (nullptr: one hidden layer), wo [S][Hlast], bo; dead [S], the state of a dead cell.
template <typename T>
struct Net {
  const T *wp, *w1, *b1, *wh, *bh, *wo, *bo, *dead;
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

template <typename T>
__device__ __forceinline__ T output_activate(T v, int64_t output_activation) {
  return output_activation == kOutputTanh ? tanh(v) : v;
}

template <typename T>
__device__ __forceinline__ T output_slope(T c, int64_t output_activation) {
  return output_activation == kOutputTanh ? T(1) - c * c : T(1);
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

// The cell (index over the batch) that cell n = (b; x, y, z) reads through each slot, -1 for zeros.
__device__ __forceinline__ void find_slots(const Dims& d, int64_t n, int* nbr) {
  int64_t b, x, y, z;
  decode(d, n, &b, &x, &y, &z);
  for (int k = 0; k < d.K; ++k) {
    int dx, dy, dz;
    slot_offset(d.rule.neighbourhood, k, &dx, &dy, &dz);
    const int64_t m = cell_read(x, y, z, dx, dy, dz, d.X, d.Y, d.Z, d.rule.boundary);
    nbr[k] = m < 0 ? -1 : static_cast<int>(b * d.cells + m);
  }
}

// The step of one cell: its perception, hidden activations and change (after the output activation) into
// its row.  `states` holds the cells nbr[] index (nbr = -1: zeros), `u` is its external input.
template <int L, typename T>
__device__ __forceinline__ void cell_forward(const Dims& d, const Net<T>& w, const T* states, const int* nbr,
                                             const T* u, T* row) {
  const int64_t S = L > 0 ? L : d.S, K = d.K, F = d.F, SF = S * F, H1 = d.H1, H2 = d.H2, In = d.In, SI = d.SI;
  T* perception = row;
  T* h1 = row + row_h1(d);
  T* h2 = row + row_h2(d);
  T* change = row + row_change(d);
  if (F > 0) {  // perception[c*F + f] = sum over slots k of wp[c][f][k] * state_k[c]
    for (int64_t cf = 0; cf < SF; ++cf) {
      const int64_t c = cf / F;
      const T* wk = w.wp + cf * K;
      T a = T(0);
      for (int k = 0; k < K; ++k)
        if (nbr[k] >= 0) a += wk[k] * states[static_cast<int64_t>(nbr[k]) * S + c];
      perception[cf] = a;
    }
  }
  for (int64_t j = 0; j < H1; ++j) {
    const T* wr = w.w1 + j * In;
    T a = w.b1[j];
    if (F > 0) {
      for (int64_t i = 0; i < SF; ++i) a += wr[i] * perception[i];
    } else {
      for (int k = 0; k < K; ++k) {
        if (nbr[k] < 0) continue;
        const T* p = states + static_cast<int64_t>(nbr[k]) * S;
        const T* ws = wr + k * S;
#pragma unroll
        for (int64_t c = 0; c < S; ++c) a += ws[c] * p[c];
      }
    }
    for (int64_t e = 0; e < d.E; ++e) a += wr[SI + e] * u[e];
    h1[j] = activate(a, d.rule.activation);
  }
  const T* last = h1;
  if (H2 > 0) {
    for (int64_t i = 0; i < H2; ++i) {
      const T* wr = w.wh + i * H1;
      T a = w.bh[i];
      for (int64_t j = 0; j < H1; ++j) a += wr[j] * h1[j];
      h2[i] = activate(a, d.rule.activation);
    }
    last = h2;
  }
  const int64_t Hl = H2 > 0 ? H2 : H1;
#pragma unroll
  for (int64_t i = 0; i < S; ++i) {
    const T* wr = w.wo + i * Hl;
    T a = w.bo[i];
    for (int64_t j = 0; j < Hl; ++j) a += wr[j] * last[j];
    change[i] = output_activate(a, d.rule.output_activation);
  }
}

// The new state of a cell from its old one and its change: where it fires, the change ("replace") or the old
// state plus step_size times it ("residual"); elsewhere the old state.
template <int L, typename T>
__device__ __forceinline__ void store_step(const Dims& d, const T* change, const T* cur, bool fires, T* next) {
  const int64_t S = L > 0 ? L : d.S;
  const T step = static_cast<T>(d.rule.step_size);
#pragma unroll
  for (int64_t i = 0; i < S; ++i)
    next[i] = !fires ? cur[i] : d.rule.update == kReplace ? change[i] : cur[i] + step * change[i];
}

// Whether the alive channel exceeds the threshold somewhere in the 3x3x3 block of cell (x, y, z) of a sample
// whose states start at `sample` (cells beyond the lattice ignored, whatever the boundary).
template <typename T>
__device__ __forceinline__ bool alive_at(const Dims& d, const T* sample, int64_t x, int64_t y, int64_t z) {
  const T threshold = static_cast<T>(d.rule.alive_threshold);
  for (int64_t u = x > 0 ? x - 1 : 0; u <= (x + 1 < d.X ? x + 1 : d.X - 1); ++u)
    for (int64_t v = y > 0 ? y - 1 : 0; v <= (y + 1 < d.Y ? y + 1 : d.Y - 1); ++v)
      for (int64_t t = z > 0 ? z - 1 : 0; t <= (z + 1 < d.Z ? z + 1 : d.Z - 1); ++t)
        if (sample[((u * d.Y + v) * d.Z + t) * d.S + d.rule.alive_channel] > threshold) return true;
  return false;
}

// Where a kernel's scratch rows are: in the block's dynamic shared memory (global == nullptr), else its
// block's part of a global buffer.  Rows of values first, then K ints per thread (the slots' cells).
template <typename T>
struct Rows {
  T* values;
  int* slots;
  __device__ __forceinline__ T* row(int64_t r, const Dims& d) const { return values + r * d.stride; }
  __device__ __forceinline__ int* nbr(int64_t r, const Dims& d) const { return slots + r * d.K; }
};

template <typename T>
__device__ __forceinline__ Rows<T> block_rows(const Dims& d, unsigned char* shared, T* global_values,
                                              int* global_slots) {
  const int64_t threads = blockDim.x;
  if (global_values == nullptr) {
    T* values = reinterpret_cast<T*>(shared);
    return {values, reinterpret_cast<int*>(values + threads * d.stride)};
  }
  return {global_values + blockIdx.x * threads * d.stride, global_slots + blockIdx.x * threads * d.K};
}

// ---- forward ---------------------------------------------------------------------------------------------

// One step, one thread per cell: state -> out, the change applied where fire (this step's bytes, [N], or
// nullptr: everywhere) is set.
template <typename T, int L>
__global__ void __launch_bounds__(kThreads) forward_step_kernel(Dims d, Net<T> w, const T* __restrict__ state,
                                                                const T* __restrict__ external,
                                                                const uint8_t* __restrict__ fire, T* __restrict__ out,
                                                                T* global_values, int* global_slots) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Rows<T> rows = block_rows<T>(d, smem_raw, global_values, global_slots);
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= d.N) return;
  const int64_t S = L > 0 ? L : d.S;
  T* row = rows.row(threadIdx.x, d);
  int* nbr = rows.nbr(threadIdx.x, d);
  find_slots(d, n, nbr);
  cell_forward<L>(d, w, state, nbr, external + n * d.E, row);
  store_step<L>(d, row + row_change(d), state + n * S, fire == nullptr || fire[n], out + n * S);
}

// The alive masks of one step, one thread per cell: life[n] = alive in `before` and in `after`.
template <typename T>
__global__ void __launch_bounds__(kThreads) alive_kernel(Dims d, const T* __restrict__ before,
                                                         const T* __restrict__ after, uint8_t* __restrict__ life) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= d.N) return;
  int64_t b, x, y, z;
  decode(d, n, &b, &x, &y, &z);
  const int64_t sample = b * d.cells * d.S;
  life[n] = alive_at(d, before + sample, x, y, z) && alive_at(d, after + sample, x, y, z);
}

// Dead cells (life[n] = 0) take the dead state.
template <typename T>
__global__ void __launch_bounds__(kThreads) bury_kernel(Dims d, const T* __restrict__ dead,
                                                        const uint8_t* __restrict__ life, T* __restrict__ state) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= d.N || life[n]) return;
  for (int64_t i = 0; i < d.S; ++i) state[n * d.S + i] = dead[i];
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

// Shared memory of the fused forward: the two state buffers, the external input, a byte per cell for the
// alive masks (rounded to 16 bytes), then the threads' rows.
template <typename T>
__host__ __device__ __forceinline__ size_t fused_state_bytes(const Dims& d) {
  const size_t values = sizeof(T) * static_cast<size_t>(2 * d.cells * d.S + d.cells * d.E);
  const size_t life = d.rule.alive_channel >= 0 ? static_cast<size_t>(d.cells) : 0;
  return (values + life + 15) / 16 * 16;
}

template <typename T>
__host__ __device__ __forceinline__ size_t row_bytes(const Dims& d) {
  return sizeof(T) * static_cast<size_t>(d.stride) + sizeof(int) * static_cast<size_t>(d.K);
}

// All T steps of one sample in one block: states ping-pong between two shared-memory buffers.
// trajectory: [T + 1, B, cells, S] when keep, else [1, B, cells, S] (the final state only); life: [T][N] when
// keep, else nullptr.
template <typename T, int L>
__global__ void __launch_bounds__(kThreads) forward_fused_kernel(Dims d, Net<T> w, int64_t steps, bool keep,
                                                                 const T* __restrict__ state,
                                                                 const T* __restrict__ external,
                                                                 const uint8_t* __restrict__ fire,
                                                                 uint8_t* __restrict__ life,
                                                                 T* __restrict__ trajectory) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t S = L > 0 ? L : d.S, per_sample = d.cells * S, b = blockIdx.x, first = b * d.cells;
  T* const even = reinterpret_cast<T*>(smem_raw);  // the states of steps 0, 2, 4, ...
  T* const odd = even + per_sample;                 // and of steps 1, 3, 5, ...
  T* const ext = odd + per_sample;
  uint8_t* const lives = reinterpret_cast<uint8_t*>(ext + d.cells * d.E);
  const Rows<T> rows = block_rows<T>(d, smem_raw + fused_state_bytes<T>(d), nullptr, nullptr);
  T* row = rows.row(threadIdx.x, d);
  int* nbr = rows.nbr(threadIdx.x, d);
  for (int64_t i = threadIdx.x; i < per_sample; i += blockDim.x) even[i] = state[b * per_sample + i];
  for (int64_t i = threadIdx.x; i < d.cells * d.E; i += blockDim.x) ext[i] = external[first * d.E + i];
  __syncthreads();
  for (int64_t t = 0; t < steps; ++t) {
    const T* cur = (t & 1) ? odd : even;
    T* next = (t & 1) ? even : odd;
    for (int64_t cell = threadIdx.x; cell < d.cells; cell += blockDim.x) {
      find_slots(d, cell, nbr);  // indices within the sample: cell < cells
      cell_forward<L>(d, w, cur, nbr, ext + cell * d.E, row);
      const bool fires = fire == nullptr || fire[t * d.N + first + cell];
      store_step<L>(d, row + row_change(d), cur + cell * S, fires, next + cell * S);
    }
    __syncthreads();
    if (d.rule.alive_channel >= 0) {  // every cell's result first, then the masks (they read neighbours), then burial
      for (int64_t cell = threadIdx.x; cell < d.cells; cell += blockDim.x) {
        const int64_t z = cell % d.Z, y = (cell / d.Z) % d.Y, x = cell / (d.Y * d.Z);
        const bool lived = alive_at(d, cur, x, y, z) && alive_at(d, next, x, y, z);
        lives[cell] = lived;
        if (life != nullptr) life[t * d.N + first + cell] = lived;
      }
      __syncthreads();
      for (int64_t cell = threadIdx.x; cell < d.cells; cell += blockDim.x)
        if (!lives[cell])
          for (int64_t i = 0; i < S; ++i) next[cell * S + i] = w.dead[i];
      __syncthreads();
    }
    save_fused_step(d, t, steps, keep, next, trajectory);
  }
  if (keep) save_fused_step(d, -1, steps, keep, state + b * per_sample, trajectory);
}

// ---- backward --------------------------------------------------------------------------------------------

// The weight gradients as one flat vector [wp (S*F*K) | w1 (H1*In) | b1 (H1) | wh (H2*H1) | bh (H2) |
// wo (S*Hlast) | bo (S)].
struct WeightOffsets {
  int64_t wp, w1, b1, wh, bh, wo, bo, count;
};

__host__ __device__ __forceinline__ WeightOffsets weight_offsets(const Dims& d) {
  WeightOffsets o;
  o.wp = 0;
  o.w1 = o.wp + d.S * d.F * d.K;
  o.b1 = o.w1 + d.H1 * d.In;
  o.wh = o.b1 + d.H1;
  o.bh = o.wh + d.H2 * d.H1;
  o.wo = o.bh + d.H2;
  o.bo = o.wo + d.S * (d.H2 > 0 ? d.H2 : d.H1);
  o.count = o.bo + d.S;
  return o;
}

// Backward of one cell whose row holds its forward (cell_forward: the recompute), the change gradient, hidden
// gradient and input gradient passes: the change's gradient (output slope times d next / d change times the
// upstream gradient where a live cell fired, else zero) into the change's slot, then dh2, dh1 and dperception;
// the external input's gradient added; what the cell's readers need into `send`.
template <int L, typename T>
__device__ __forceinline__ void cell_backward(const Dims& d, const Net<T>& w, int64_t n, bool gets_change,
                                              const T* __restrict__ grad_out, T* row, T* grad_external, T* send) {
  const int64_t S = L > 0 ? L : d.S, F = d.F, SF = S * F, H1 = d.H1, H2 = d.H2, In = d.In, SI = d.SI;
  const T scale = !gets_change ? T(0) : d.rule.update == kReplace ? T(1) : static_cast<T>(d.rule.step_size);
  T* dchange = row + row_change(d);
  T* h1 = row + row_h1(d);
  T* h2 = row + row_h2(d);
  T* dh1 = row + row_dh1(d);
  T* dh2 = row + row_dh2(d);
#pragma unroll
  for (int64_t i = 0; i < S; ++i)
    dchange[i] = scale * grad_out[n * S + i] * output_slope(dchange[i], d.rule.output_activation);
  const int64_t Hl = H2 > 0 ? H2 : H1;
  T* dlast = H2 > 0 ? dh2 : dh1;
  const T* last = H2 > 0 ? h2 : h1;
  for (int64_t j = 0; j < Hl; ++j) {
    T a = T(0);
#pragma unroll
    for (int64_t i = 0; i < S; ++i) a += w.wo[i * Hl + j] * dchange[i];
    dlast[j] = a * activation_grad(last[j], d.rule.activation);
  }
  if (H2 > 0) {
    for (int64_t j = 0; j < H1; ++j) {
      T a = T(0);
      for (int64_t i = 0; i < H2; ++i) a += w.wh[i * H1 + j] * dh2[i];
      dh1[j] = a * activation_grad(h1[j], d.rule.activation);
    }
  }
  for (int64_t e = 0; e < d.E; ++e) {
    T a = T(0);
    for (int64_t j = 0; j < H1; ++j) a += w.w1[j * In + SI + e] * dh1[j];
    grad_external[n * d.E + e] += a;
  }
  if (F > 0) {
    T* dperception = row + row_dperception(d);
    for (int64_t i = 0; i < SF; ++i) {
      T a = T(0);
      for (int64_t j = 0; j < H1; ++j) a += w.w1[j * In + i] * dh1[j];
      dperception[i] = a;
      send[n * SF + i] = a;
    }
  } else {
    for (int64_t j = 0; j < H1; ++j) send[n * H1 + j] = dh1[j];
  }
}

// Recompute, change gradient, hidden gradient and input gradient of one step (see the top of the file).
// fire, life: this step's bytes, or nullptr.
template <typename T, int L>
__global__ void __launch_bounds__(kThreads) backward_tile_kernel(
    Dims d, Net<T> w, const T* __restrict__ state, const T* __restrict__ external, const uint8_t* __restrict__ fire,
    const uint8_t* __restrict__ life, const T* __restrict__ grad_out, T* __restrict__ grad_external,
    T* __restrict__ send, T* __restrict__ partial, T* global_values, int* global_slots) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Rows<T> rows = block_rows<T>(d, smem_raw, global_values, global_slots);
  const int64_t S = L > 0 ? L : d.S, F = d.F, K = d.K, H1 = d.H1, H2 = d.H2, In = d.In, SI = d.SI;
  const int64_t Hl = H2 > 0 ? H2 : H1, C = blockDim.x, c = threadIdx.x, tiles = (d.N + C - 1) / C;
  const WeightOffsets o = weight_offsets(d);
  T* row = rows.row(c, d);
  int* nbr = rows.nbr(c, d);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t n = tile * C + c;
    if (n < d.N) {
      find_slots(d, n, nbr);
      cell_forward<L>(d, w, state, nbr, external + n * d.E, row);
      const bool gets_change = (life == nullptr || life[n]) && (fire == nullptr || fire[n]);
      cell_backward<L>(d, w, n, gets_change, grad_out, row, grad_external, send);
    }
    __syncthreads();
    // Thread c sums weights c, c + C, ... over the tile's rows, in row order.
    const int64_t count = d.N - tile * C < C ? d.N - tile * C : C;
    for (int64_t wi = c; wi < o.count; wi += C) {
      T acc = T(0);
      if (wi < o.w1) {  // wp[ch][f][k]: dperception[ch*F + f] times the channel ch of the state slot k reads
        const int64_t k = wi % K, cf = wi / K, ch = cf / F;
        for (int64_t r = 0; r < count; ++r) {
          const int m = rows.nbr(r, d)[k];
          if (m >= 0) acc += rows.row(r, d)[row_dperception(d) + cf] * state[static_cast<int64_t>(m) * S + ch];
        }
      } else if (wi < o.b1) {  // w1[j][i]: dh1[j] times input i (a slot's state, the perception, the external)
        const int64_t j = (wi - o.w1) / In, i = (wi - o.w1) % In;
        for (int64_t r = 0; r < count; ++r) {
          const T* rr = rows.row(r, d);
          T in;
          if (i >= SI) {
            in = external[(tile * C + r) * d.E + (i - SI)];
          } else if (F > 0) {
            in = rr[i];
          } else {
            const int m = rows.nbr(r, d)[i / S];
            in = m < 0 ? T(0) : state[static_cast<int64_t>(m) * S + i % S];
          }
          acc += rr[row_dh1(d) + j] * in;
        }
      } else if (wi < o.wh) {  // b1[j]
        for (int64_t r = 0; r < count; ++r) acc += rows.row(r, d)[row_dh1(d) + (wi - o.b1)];
      } else if (wi < o.bh) {  // wh[i][j]: dh2[i] times h1[j]
        const int64_t i = (wi - o.wh) / H1, j = (wi - o.wh) % H1;
        for (int64_t r = 0; r < count; ++r) {
          const T* rr = rows.row(r, d);
          acc += rr[row_dh2(d) + i] * rr[row_h1(d) + j];
        }
      } else if (wi < o.wo) {  // bh[i]
        for (int64_t r = 0; r < count; ++r) acc += rows.row(r, d)[row_dh2(d) + (wi - o.bh)];
      } else if (wi < o.bo) {  // wo[i][j]: dchange[i] times the last hidden activation j
        const int64_t i = (wi - o.wo) / Hl, j = (wi - o.wo) % Hl;
        const int64_t last = H2 > 0 ? row_h2(d) : row_h1(d);
        for (int64_t r = 0; r < count; ++r) {
          const T* rr = rows.row(r, d);
          acc += rr[row_change(d) + i] * rr[last + j];
        }
      } else {  // bo[i]
        for (int64_t r = 0; r < count; ++r) acc += rows.row(r, d)[row_change(d) + (wi - o.bo)];
      }
      partial[blockIdx.x * o.count + wi] += acc;
    }
    __syncthreads();  // the rows are rewritten by the next tile
  }
}

// State gradient of one step: per cell n, its state gradient: its own path past the change (residual: where it
// lived; replace: where it lived and did not fire) plus what its readers send back through each slot.
template <typename T, int L>
__global__ void __launch_bounds__(kThreads) backward_gather_kernel(Dims d, Net<T> w, const uint8_t* __restrict__ fire,
                                                                   const uint8_t* __restrict__ life,
                                                                   const T* __restrict__ send,
                                                                   const T* __restrict__ grad_out,
                                                                   T* __restrict__ grad_in) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= d.N) return;
  const int64_t S = L > 0 ? L : d.S, F = d.F, K = d.K, H1 = d.H1, In = d.In;
  int64_t b, x, y, z;
  decode(d, n, &b, &x, &y, &z);
  const bool lived = life == nullptr || life[n], fired = fire == nullptr || fire[n];
  const bool through = lived && (d.rule.update == kResidual || !fired);
  T acc[L > 0 ? L : kMaxCudaState];
#pragma unroll
  for (int64_t c = 0; c < S; ++c) acc[c] = through ? grad_out[n * S + c] : T(0);
  for (int k = 0; k < K; ++k) {
    int dx, dy, dz;
    slot_offset(d.rule.neighbourhood, k, &dx, &dy, &dz);
    int64_t xs[4], ys[4], zs[4];
    const int nx = readers_on_axis(x, dx, d.X, d.rule.boundary, xs), ny = readers_on_axis(y, dy, d.Y, d.rule.boundary, ys),
              nz = readers_on_axis(z, dz, d.Z, d.rule.boundary, zs);
    for (int ix = 0; ix < nx; ++ix)
      for (int iy = 0; iy < ny; ++iy)
        for (int iz = 0; iz < nz; ++iz) {
          const int64_t r = b * d.cells + (xs[ix] * d.Y + ys[iy]) * d.Z + zs[iz];
          if (F > 0) {
            const T* dp = send + r * S * F;
#pragma unroll
            for (int64_t c = 0; c < S; ++c)
              for (int64_t f = 0; f < F; ++f) acc[c] += w.wp[(c * F + f) * K + k] * dp[c * F + f];
          } else {
            const T* dh = send + r * H1;
            for (int64_t j = 0; j < H1; ++j) {
              const T* ws = w.w1 + j * In + k * S;
              const T v = dh[j];
#pragma unroll
              for (int64_t c = 0; c < S; ++c) acc[c] += ws[c] * v;
            }
          }
        }
  }
#pragma unroll
  for (int64_t c = 0; c < S; ++c) grad_in[n * S + c] = acc[c];
}

// Weight gradient sum, once after the last step: each weight's gradient is its column of the table summed in block order.
template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(int64_t n_weights, int64_t blocks,
                                                                   const T* __restrict__ partial,
                                                                   T* __restrict__ grad_weights) {
  const int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (w >= n_weights) return;
  T acc = T(0);
  for (int64_t c = 0; c < blocks; ++c) acc += partial[c * n_weights + w];
  grad_weights[w] = acc;
}

// ---- tensor cores (precision tf32, bfloat16, float16; float32 states) ------------------------------------------
//
// The update net's products on WMMA (nvcuda::wmma), the rest as above.  A block of kTcThreads (4 warps) takes
// tiles of M cells (16, 32 or 64) in turn; the weights are staged once per block in shared memory, converted to
// the fragment type and zero-padded to multiples of 16; per tile the first layer's inputs X [M][In] (the
// perception computed on the way, in float32, for depthwise; the slots' states for concat; then the external
// input) are gathered into shared memory, and each layer is one GEMM, [M][in] x W^T, whose 16x16 output tiles
// the warps share out.  Fragments are treated opaquely: every product goes through shared memory with
// load/store_matrix_sync, and the epilogues (bias, activation, output activation, update, fire mask; in the
// backward the slopes and masks) run element-wise on the float32 results in shared memory.  The states, the
// update, every accumulation and the weight-gradient sums stay float32.
//
// Forward: tc_forward_step_kernel, one launch per step (alive_kernel and bury_kernel after it, as above).
// Backward, per step: tc_backward_tile_kernel recomputes a tile's forward the same way, pushes the gradient back
// with dX = dY W (WMMA), takes the weight gradients X^T dY (WMMA) and the biases' (row sums, in row order), and
// adds them to its block's row of the [blocks, weights] table; the depthwise perception weights' gradient is the
// scalar sum the FMA path takes.  backward_gather_kernel (the state gradient) and reduce_partials_kernel (the
// table in block order) are the FMA path's: no atomics, the same bits whatever the schedule.
//
// Compiled for sm_80 and later (TF32 and bf16 fragments): on older devices the kernels are empty and the host
// refuses precisions other than ieee (check_cuda_precision).

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define CUBECORE_TC_BODY 1
#else
#define CUBECORE_TC_BODY 0
#endif

constexpr int kTcThreads = 128;

// The fragment kinds: the fragment element type, the type staged in shared memory, the k of a 16x16xk product.
struct TcTf32 {
#if CUBECORE_TC_BODY
  using frag = wmma::precision::tf32;
  __device__ static float conv(float v) { return wmma::__float_to_tf32(v); }
#else  // below sm_80 (no TF32 fragments): never launched there (check_cuda_precision)
  using frag = float;
  __device__ static float conv(float v) { return v; }
#endif
  using smem = float;
  static constexpr int K = 8;
};
struct TcBf16 {
  using frag = __nv_bfloat16;
  using smem = __nv_bfloat16;
  static constexpr int K = 16;
  __device__ static __nv_bfloat16 conv(float v) { return __float2bfloat16(v); }
};
struct TcHalf {
  using frag = __half;
  using smem = __half;
  static constexpr int K = 16;
  __device__ static __half conv(float v) { return __float2half(v); }
};

// Where a tile's buffers lie in the block's dynamic shared memory (byte offsets, each 128-byte aligned) and
// their leading dimensions.  Padded sizes (*_p) are multiples of 16; a fragment-typed buffer of n_p columns
// has ld = n_p + 16 bytes' worth (another bank per row), a float32 one n_p + 4.  Weights: w1 [H1_p][ld_in],
// wh [H2_p][ld_h1], wo [S_p][ld_hl] (the op's [out][in] order: W^T as a col-major B, W as a row-major one).
// Per tile: x [M][ld_in], a1 [M][ld_h1], a2 [M][ld_h2] (h1, h2 as multiplicands); the backward also keeps
// f1 [M][lf_h1], f2 [M][lf_h2] (h1, h2 in float32, then their gradients), fd [M][lf_s] (the change, then
// its gradient) and their multiplicand copies g1, g2, dd; c is the float32 product of every GEMM.
struct TcLayout {
  int M, in_p, h1_p, h2_p, s_p, hl_p;
  int ld_in, ld_h1, ld_h2, ld_s, ld_hl, lf_h1, lf_h2, lf_s, lf_c;
  size_t w1, wh, wo, x, a1, a2, g1, g2, dd, f1, f2, fd, c, nbr, bytes;
};

inline int pad16(int64_t n) { return static_cast<int>((n + 15) / 16 * 16); }

TcLayout tc_layout(const Dims& d, int M, size_t elem, bool backward) {
  TcLayout t;
  t.M = M;
  t.in_p = pad16(d.In);
  t.h1_p = pad16(d.H1);
  t.h2_p = pad16(d.H2);
  t.s_p = pad16(d.S);
  t.hl_p = d.H2 > 0 ? t.h2_p : t.h1_p;
  const int extra = static_cast<int>(16 / elem);
  t.ld_in = t.in_p + extra;
  t.ld_h1 = t.h1_p + extra;
  t.ld_h2 = t.h2_p + extra;
  t.ld_s = t.s_p + extra;
  t.ld_hl = t.hl_p + extra;
  t.lf_h1 = t.h1_p + 4;
  t.lf_h2 = t.h2_p + 4;
  t.lf_s = t.s_p + 4;
  const int widest = std::max({t.in_p, t.h1_p, t.h2_p, t.s_p});
  const int tallest = std::max({M, t.h1_p, t.h2_p, t.s_p});
  t.lf_c = widest + 4;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += (bytes + 127) / 128 * 128;
    return here;
  };
  t.w1 = take(elem * t.h1_p * t.ld_in);
  t.wh = take(elem * t.h2_p * t.ld_h1);
  t.wo = take(elem * t.s_p * t.ld_hl);
  t.x = take(elem * M * t.ld_in);
  t.a1 = take(elem * M * t.ld_h1);
  t.a2 = take(elem * M * (d.H2 > 0 ? t.ld_h2 : 0));
  t.g1 = take(backward ? elem * M * t.ld_h1 : 0);
  t.g2 = take(backward && d.H2 > 0 ? elem * M * t.ld_h2 : 0);
  t.dd = take(backward ? elem * M * t.ld_s : 0);
  t.f1 = take(backward ? sizeof(float) * M * t.lf_h1 : 0);
  t.f2 = take(backward && d.H2 > 0 ? sizeof(float) * M * t.lf_h2 : 0);
  t.fd = take(backward ? sizeof(float) * M * t.lf_s : 0);
  t.c = take(sizeof(float) * tallest * t.lf_c);
  t.nbr = take(sizeof(int) * M * d.K);
  t.bytes = at;
  return t;
}

// C [M][N] (float32, ldc) = A [M][K] x B [K][N] on the block's warps, one 16x16 output tile per warp in turn;
// A row-major (A(m, k) = A[m * lda + k]) or col-major (A[k * lda + m]), B likewise; M, N, K multiples of 16.
template <class P, class ALayout, class BLayout>
__device__ __forceinline__ void tc_gemm(const typename P::smem* A, int lda, const typename P::smem* B, int ldb,
                                        float* C, int ldc, int M, int N, int K) {
#if CUBECORE_TC_BODY
  constexpr bool a_col = std::is_same<ALayout, wmma::col_major>::value;
  constexpr bool b_col = std::is_same<BLayout, wmma::col_major>::value;
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32, tn = N / 16, tiles = (M / 16) * tn;
  for (int t = warp; t < tiles; t += warps) {
    const int m0 = t / tn * 16, n0 = t % tn * 16;
    wmma::fragment<wmma::accumulator, 16, 16, P::K, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k0 = 0; k0 < K; k0 += P::K) {
      wmma::fragment<wmma::matrix_a, 16, 16, P::K, typename P::frag, ALayout> a;
      wmma::fragment<wmma::matrix_b, 16, 16, P::K, typename P::frag, BLayout> b;
      wmma::load_matrix_sync(a, a_col ? A + k0 * lda + m0 : A + m0 * lda + k0, lda);
      wmma::load_matrix_sync(b, b_col ? B + n0 * ldb + k0 : B + k0 * ldb + n0, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + m0 * ldc + n0, acc, ldc, wmma::mem_row_major);
  }
#else
  __trap();  // below sm_80: never launched there (check_cuda_precision)
#endif
}

// dst [rows_p][ld] = src [rows][cols] (row-major, float32) converted, zeros in the padding.
template <class P>
__device__ __forceinline__ void tc_stage_weight(const float* src, int64_t rows, int64_t cols, int rows_p, int cols_p,
                                                int ld, typename P::smem* dst) {
  for (int e = threadIdx.x; e < rows_p * cols_p; e += blockDim.x) {
    const int r = e / cols_p, c = e % cols_p;
    dst[r * ld + c] = P::conv(r < rows && c < cols ? src[r * cols + c] : 0.0f);
  }
}

template <class P>
struct TcShared {
  typename P::smem *w1, *wh, *wo, *x, *a1, *a2, *g1, *g2, *dd;
  float *f1, *f2, *fd, *c;
  int* nbr;
  __device__ TcShared(unsigned char* s, const TcLayout& t) {
    using Sm = typename P::smem;
    w1 = reinterpret_cast<Sm*>(s + t.w1);
    wh = reinterpret_cast<Sm*>(s + t.wh);
    wo = reinterpret_cast<Sm*>(s + t.wo);
    x = reinterpret_cast<Sm*>(s + t.x);
    a1 = reinterpret_cast<Sm*>(s + t.a1);
    a2 = reinterpret_cast<Sm*>(s + t.a2);
    g1 = reinterpret_cast<Sm*>(s + t.g1);
    g2 = reinterpret_cast<Sm*>(s + t.g2);
    dd = reinterpret_cast<Sm*>(s + t.dd);
    f1 = reinterpret_cast<float*>(s + t.f1);
    f2 = reinterpret_cast<float*>(s + t.f2);
    fd = reinterpret_cast<float*>(s + t.fd);
    c = reinterpret_cast<float*>(s + t.c);
    nbr = reinterpret_cast<int*>(s + t.nbr);
  }
};

// The block's weights into shared memory, once (a barrier after).
template <class P>
__device__ __forceinline__ void tc_stage_weights(const Dims& d, const Net<float>& w, const TcLayout& t,
                                                 const TcShared<P>& sh) {
  tc_stage_weight<P>(w.w1, d.H1, d.In, t.h1_p, t.in_p, t.ld_in, sh.w1);
  if (d.H2 > 0) tc_stage_weight<P>(w.wh, d.H2, d.H1, t.h2_p, t.h1_p, t.ld_h1, sh.wh);
  tc_stage_weight<P>(w.wo, d.S, d.H2 > 0 ? d.H2 : d.H1, t.s_p, t.hl_p, t.ld_hl, sh.wo);
  __syncthreads();
}

// The tile's slots (nbr [M][K]) and first-layer inputs X [M][in_p] (rows past the last cell and padding zero).
template <class P>
__device__ __forceinline__ void tc_stage_inputs(const Dims& d, const Net<float>& w, const TcLayout& t,
                                                const TcShared<P>& sh, int64_t first, const float* state,
                                                const float* external) {
  const int M = t.M;
  const int64_t S = d.S, F = d.F, K = d.K, SI = d.SI, In = d.In;
  for (int m = threadIdx.x; m < M; m += blockDim.x)
    if (first + m < d.N) find_slots(d, first + m, sh.nbr + m * K);
  __syncthreads();
  for (int e = threadIdx.x; e < M * t.in_p; e += blockDim.x) {
    const int m = e / t.in_p, i = e % t.in_p;
    const int64_t n = first + m;
    const int* nbr = sh.nbr + m * K;
    float v = 0.0f;
    if (n < d.N && i < In) {
      if (i >= SI) {
        v = external[n * d.E + (i - SI)];
      } else if (F > 0) {  // perception[c*F + f] = sum over slots k of wp[c][f][k] * state_k[c]
        const int64_t ch = i / F;
        const float* wk = w.wp + i * K;
        for (int k = 0; k < K; ++k)
          if (nbr[k] >= 0) v += wk[k] * state[static_cast<int64_t>(nbr[k]) * S + ch];
      } else {
        const int m_k = nbr[i / S];
        v = m_k < 0 ? 0.0f : state[static_cast<int64_t>(m_k) * S + i % S];
      }
    }
    sh.x[m * t.ld_in + i] = P::conv(v);
  }
#ifndef CUBECORE_PLANT_MISSING_BARRIER  // a mutant for the tests: the first GEMM reads X before it is staged
  __syncthreads();
#endif
}

// The hidden layers of the tile's forward: a1 (and f1) = act(X W1^T + b1), then a2 (and f2) = act(a1 Wh^T + bh);
// then the output layer's pre-activation into c [M][s_p] (ld lf_c).  f1, f2 only where `keep` (the backward).
template <class P>
__device__ __forceinline__ void tc_layers(const Dims& d, const Net<float>& w, const TcLayout& t,
                                          const TcShared<P>& sh, bool keep) {
  using Row = wmma::row_major;
  using Col = wmma::col_major;
  const int M = t.M;
  const int64_t H1 = d.H1, H2 = d.H2;
  tc_gemm<P, Row, Col>(sh.x, t.ld_in, sh.w1, t.ld_in, sh.c, t.lf_c, M, t.h1_p, t.in_p);
  __syncthreads();
  for (int e = threadIdx.x; e < M * t.h1_p; e += blockDim.x) {
    const int m = e / t.h1_p, j = e % t.h1_p;
    const float h = j < H1 ? activate(sh.c[m * t.lf_c + j] + w.b1[j], d.rule.activation) : 0.0f;
    sh.a1[m * t.ld_h1 + j] = P::conv(h);
    if (keep) sh.f1[m * t.lf_h1 + j] = h;
  }
  __syncthreads();
  if (H2 > 0) {
    tc_gemm<P, Row, Col>(sh.a1, t.ld_h1, sh.wh, t.ld_h1, sh.c, t.lf_c, M, t.h2_p, t.h1_p);
    __syncthreads();
    for (int e = threadIdx.x; e < M * t.h2_p; e += blockDim.x) {
      const int m = e / t.h2_p, j = e % t.h2_p;
      const float h = j < H2 ? activate(sh.c[m * t.lf_c + j] + w.bh[j], d.rule.activation) : 0.0f;
      sh.a2[m * t.ld_h2 + j] = P::conv(h);
      if (keep) sh.f2[m * t.lf_h2 + j] = h;
    }
    __syncthreads();
  }
  tc_gemm<P, Row, Col>(H2 > 0 ? sh.a2 : sh.a1, t.ld_hl, sh.wo, t.ld_hl, sh.c, t.lf_c, M, t.s_p, t.hl_p);
  __syncthreads();
}

// One step on tensor cores: state -> out, the change applied where fire (this step's bytes, or nullptr) is set.
template <class P>
__global__ void __launch_bounds__(kTcThreads) tc_forward_step_kernel(Dims d, Net<float> w, TcLayout t,
                                                                     const float* __restrict__ state,
                                                                     const float* __restrict__ external,
                                                                     const uint8_t* __restrict__ fire,
                                                                     float* __restrict__ out) {
  extern __shared__ __align__(128) unsigned char tc_smem[];
  const TcShared<P> sh(tc_smem, t);
  const int64_t S = d.S, tiles = (d.N + t.M - 1) / t.M;
  const float step = static_cast<float>(d.rule.step_size);
  tc_stage_weights<P>(d, w, t, sh);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t first = tile * t.M;
    tc_stage_inputs<P>(d, w, t, sh, first, state, external);
    tc_layers<P>(d, w, t, sh, false);
    for (int e = threadIdx.x; e < t.M * S; e += blockDim.x) {
      const int m = static_cast<int>(e / S), i = static_cast<int>(e % S);
      const int64_t n = first + m;
      if (n >= d.N) continue;
      const float cur = state[n * S + i];
      const float change = output_activate(sh.c[m * t.lf_c + i] + w.bo[i], d.rule.output_activation);
      const bool fires = fire == nullptr || fire[n];
      out[n * S + i] = !fires ? cur : d.rule.update == kReplace ? change : cur + step * change;
    }
    __syncthreads();  // the tile's buffers are rewritten by the next
  }
}

// block's row of the table += the float32 product c [rows][cols] (ld lf_c), weight (r, q) at offset + r * cols + q.
__device__ __forceinline__ void tc_add_partial(const float* c, int ldc, int64_t rows, int64_t cols, float* partial) {
  for (int64_t e = threadIdx.x; e < rows * cols; e += blockDim.x) partial[e] += c[(e / cols) * ldc + e % cols];
}

// A bias's gradient: the column sums of g [M][ld] over the tile's rows, in row order.
__device__ __forceinline__ void tc_add_bias(const float* g, int ld, int M, int64_t cols, float* partial) {
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    float acc = 0.0f;
    for (int m = 0; m < M; ++m) acc += g[m * ld + j];
    partial[j] += acc;
  }
}

// Recompute, change gradient, hidden gradient, input gradient and the weight gradients of one step on tensor
// cores (see above).  fire, life: this step's bytes, or nullptr.
template <class P>
__global__ void __launch_bounds__(kTcThreads) tc_backward_tile_kernel(
    Dims d, Net<float> w, TcLayout t, const float* __restrict__ state, const float* __restrict__ external,
    const uint8_t* __restrict__ fire, const uint8_t* __restrict__ life, const float* __restrict__ grad_out,
    float* __restrict__ grad_external, float* __restrict__ send, float* __restrict__ partial) {
  using Row = wmma::row_major;
  using Col = wmma::col_major;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  const TcShared<P> sh(tc_smem, t);
  const int M = t.M;
  const int64_t S = d.S, F = d.F, K = d.K, SF = S * F, H1 = d.H1, H2 = d.H2, In = d.In, SI = d.SI, E = d.E;
  const int64_t Hl = H2 > 0 ? H2 : H1, tiles = (d.N + M - 1) / M;
  const WeightOffsets o = weight_offsets(d);
  float* const mine = partial + blockIdx.x * o.count;
  const float scale = d.rule.update == kReplace ? 1.0f : static_cast<float>(d.rule.step_size);
  typename P::smem* const al = H2 > 0 ? sh.a2 : sh.a1;  // the last hidden layer: multiplicands, floats, gradients
  typename P::smem* const gl = H2 > 0 ? sh.g2 : sh.g1;
  float* const fl = H2 > 0 ? sh.f2 : sh.f1;
  const int ld_fl = H2 > 0 ? t.lf_h2 : t.lf_h1;
  tc_stage_weights<P>(d, w, t, sh);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t first = tile * M;
    tc_stage_inputs<P>(d, w, t, sh, first, state, external);
    tc_layers<P>(d, w, t, sh, true);
    // The change, and its gradient: output slope times d next / d change times the upstream gradient where a
    // live cell fired, else zero (and zero in the rows past the last cell).
    for (int e = threadIdx.x; e < M * t.s_p; e += blockDim.x) {
      const int m = e / t.s_p, i = e % t.s_p;
      const int64_t n = first + m;
      float g = 0.0f;
      if (i < S && n < d.N && (life == nullptr || life[n]) && (fire == nullptr || fire[n])) {
        const float change = output_activate(sh.c[m * t.lf_c + i] + w.bo[i], d.rule.output_activation);
        g = scale * grad_out[n * S + i] * output_slope(change, d.rule.output_activation);
      }
      sh.fd[m * t.lf_s + i] = g;
      sh.dd[m * t.ld_s + i] = P::conv(g);
    }
    __syncthreads();
    // dlast = dchange Wo, times the activation's slope.
    tc_gemm<P, Row, Row>(sh.dd, t.ld_s, sh.wo, t.ld_hl, sh.c, t.lf_c, M, t.hl_p, t.s_p);
    __syncthreads();
    for (int e = threadIdx.x; e < M * t.hl_p; e += blockDim.x) {
      const int m = e / t.hl_p, j = e % t.hl_p;
      const float g = j < Hl ? sh.c[m * t.lf_c + j] * activation_grad(fl[m * ld_fl + j], d.rule.activation) : 0.0f;
      fl[m * ld_fl + j] = g;
      gl[m * t.ld_hl + j] = P::conv(g);
    }
    __syncthreads();
    if (H2 > 0) {  // dh1 = dh2 Wh, times the slope
      tc_gemm<P, Row, Row>(sh.g2, t.ld_h2, sh.wh, t.ld_h1, sh.c, t.lf_c, M, t.h1_p, t.h2_p);
      __syncthreads();
      for (int e = threadIdx.x; e < M * t.h1_p; e += blockDim.x) {
        const int m = e / t.h1_p, j = e % t.h1_p;
        const float g =
            j < H1 ? sh.c[m * t.lf_c + j] * activation_grad(sh.f1[m * t.lf_h1 + j], d.rule.activation) : 0.0f;
        sh.f1[m * t.lf_h1 + j] = g;
        sh.g1[m * t.ld_h1 + j] = P::conv(g);
      }
      __syncthreads();
    }
    // dX = dh1 W1: the external input's gradient, and what the cell's readers need (the perception's gradient,
    // or dh1 itself for concat).
    tc_gemm<P, Row, Row>(sh.g1, t.ld_h1, sh.w1, t.ld_in, sh.c, t.lf_c, M, t.in_p, t.h1_p);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < M * E; e += blockDim.x) {
      const int m = static_cast<int>(e / E);
      const int64_t n = first + m;
      if (n < d.N) grad_external[n * E + e % E] += sh.c[m * t.lf_c + SI + e % E];
    }
    const int64_t sent = F > 0 ? SF : H1;
    for (int64_t e = threadIdx.x; e < M * sent; e += blockDim.x) {
      const int m = static_cast<int>(e / sent), i = static_cast<int>(e % sent);
      const int64_t n = first + m;
      if (n < d.N) send[n * sent + i] = F > 0 ? sh.c[m * t.lf_c + i] : sh.f1[m * t.lf_h1 + i];
    }
    if (F > 0) {  // wp[ch][f][k]: dperception[ch*F + f] times the channel ch of the state slot k reads, row order
      for (int64_t wi = threadIdx.x; wi < SF * K; wi += blockDim.x) {
        const int64_t k = wi % K, cf = wi / K, ch = cf / F;
        float acc = 0.0f;
        for (int m = 0; m < M && first + m < d.N; ++m) {
          const int src = sh.nbr[m * K + k];
          if (src >= 0) acc += sh.c[m * t.lf_c + cf] * state[static_cast<int64_t>(src) * S + ch];
        }
        mine[o.wp + wi] += acc;
      }
    }
    __syncthreads();
    // The weight gradients, X^T dY on tensor cores, and the biases'.
    tc_gemm<P, Col, Row>(sh.g1, t.ld_h1, sh.x, t.ld_in, sh.c, t.lf_c, t.h1_p, t.in_p, M);
    __syncthreads();
    tc_add_partial(sh.c, t.lf_c, H1, In, mine + o.w1);
    tc_add_bias(sh.f1, t.lf_h1, M, H1, mine + o.b1);
    __syncthreads();
    if (H2 > 0) {
      tc_gemm<P, Col, Row>(sh.g2, t.ld_h2, sh.a1, t.ld_h1, sh.c, t.lf_c, t.h2_p, t.h1_p, M);
      __syncthreads();
      tc_add_partial(sh.c, t.lf_c, H2, H1, mine + o.wh);
      tc_add_bias(sh.f2, t.lf_h2, M, H2, mine + o.bh);
      __syncthreads();
    }
    tc_gemm<P, Col, Row>(sh.dd, t.ld_s, al, t.ld_hl, sh.c, t.lf_c, t.s_p, t.hl_p, M);
    __syncthreads();
    tc_add_partial(sh.c, t.lf_c, S, Hl, mine + o.wo);
    tc_add_bias(sh.fd, t.lf_s, M, S, mine + o.bo);
    __syncthreads();  // the tile's buffers are rewritten by the next
  }
}

// ---- launch choices ---------------------------------------------------------------------------------------

// Runs f(std::integral_constant<int, L>) with L = S where the kernels are compiled for that state size (8 and
// 16, the sizes cubecore's models use, and 20, the 3D artefacts NCA's), else with L = 0 (any size).
template <class F>
void with_cuda_state_length(int64_t S, bool runtime_only, F&& f) {
  if (!runtime_only) {
    if (S == 8) return f(std::integral_constant<int, 8>{});
    if (S == 16) return f(std::integral_constant<int, 16>{});
    if (S == 20) return f(std::integral_constant<int, 20>{});
  }
  f(std::integral_constant<int, 0>{});
}

int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

constexpr size_t kDefaultShared = 48 * 1024;  // dynamic shared memory per block without the opt-in attribute

// The device's facts a call's choices depend on, read once per call.
struct Device {
  int64_t sms;
  size_t shared;  // the opt-in shared memory per block, or the default where that is lower
};

Device device_facts() {
  return {device_attribute(cudaDevAttrMultiProcessorCount),
          std::max<size_t>(kDefaultShared, device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin))};
}

// Lets `kernel` take `bytes` of dynamic shared memory (past the default, the opt-in attribute says so).
template <class Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultShared)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

unsigned int blocks_of(int64_t n, int64_t threads) { return static_cast<unsigned int>((n + threads - 1) / threads); }

// Threads per block (a multiple of 32, at most `most`) for one thread per cell over n cells: as many as leave
// every SM at least one block, so that a few thousand cells spread over the whole GPU rather than filling a
// few SMs.
int64_t threads_to_fill(const Device& dev, int64_t n, int64_t most) {
  return std::max<int64_t>(32, std::min<int64_t>(most, n / dev.sms / 32 * 32));
}

// Where a kernel's scratch rows go: `threads` per block, in shared memory (`shared` bytes per block) or, where
// 32 rows do not fit beside `other` bytes (or the test hook says so), in a global buffer.
struct RowPlan {
  int64_t threads;
  size_t shared;
  bool global;
};

template <typename T>
RowPlan plan_rows(const Dims& d, const Device& dev, int64_t wanted, size_t other = 0) {
  const size_t per_row = row_bytes<T>(d);
  const int64_t fit = dev.shared > other ? static_cast<int64_t>((dev.shared - other) / per_row) / 32 * 32 : 0;
  if (fit >= 32 && !forced_paths.global_rows) {
    const int64_t threads = std::min(wanted, fit);
    return {threads, other + per_row * threads, false};
  }
  return {wanted, other, true};
}

// The buffers of global scratch rows for `count` threads (empty where the rows are in shared memory).
struct GlobalRows {
  at::Tensor values, slots;
  template <typename T>
  T* values_ptr() const { return values.defined() ? values.data_ptr<T>() : nullptr; }
  int* slots_ptr() const { return slots.defined() ? slots.data_ptr<int>() : nullptr; }
};

GlobalRows global_rows(const Dims& d, const RowPlan& plan, int64_t count, const at::TensorOptions& options) {
  if (!plan.global) return {};
  return {at::empty({count * d.stride}, options), at::empty({count * d.K}, options.dtype(at::kInt))};
}

// The fused forward's threads: fewer than the cells only where the rows would not fit beside the states; 0
// where it does not fit at all, or where its B blocks would keep fewer SMs busy than the per-step launches
// (B against the SM count: a few samples of a large lattice go per step, spread over the whole GPU).
template <typename T>
int64_t fused_threads(const Dims& d, const Device& dev) {
  if (forced_paths.forward == 1) return 0;
  const bool busy = d.B >= std::min<int64_t>(dev.sms, blocks_of(d.N, kThreads));
  if (!busy && forced_paths.forward != 2) return 0;
  for (int64_t threads = std::min<int64_t>(kThreads, (d.cells + 31) / 32 * 32); threads >= 32; threads /= 2)
    if (fused_state_bytes<T>(d) + threads * row_bytes<T>(d) <= dev.shared) return threads;
  return 0;
}

Dims make_dims(const at::Tensor& state, const OpArgs& a) {
  Dims d;
  d.B = state.size(0);
  d.X = state.size(1);
  d.Y = state.size(2);
  d.Z = state.size(3);
  d.S = state.size(4);
  d.E = a.external.size(4);
  d.K = slots_of(a.rule.neighbourhood);
  d.F = a.perception ? a.perception->size(1) : 0;
  d.H1 = a.w1.size(0);
  d.H2 = a.wh ? a.wh->size(0) : 0;
  d.In = a.w1.size(1);
  d.SI = d.In - d.E;
  d.cells = d.X * d.Y * d.Z;
  d.N = d.B * d.cells;
  d.rule = a.rule;
  d.stride = row_length(d) | 1;
  return d;
}

// The precisions the CUDA kernels run the update net's products in: the inputs' own dtype (ieee, the FMA path),
// or TF32 / bfloat16 / float16 multiplicands with float32 accumulation on tensor cores, for float32 inputs on
// devices of compute capability 8.0 or later (the front chooses them: cubecore/ops/front.py's product_precision).
void check_cuda_precision(const OpArgs& a, const at::Tensor& state) {
  const int64_t p = a.rule.precision;
  TORCH_CHECK(p == kIeee || p == kTf32 || p == kBf16 || p == kFp16, "unknown precision code ", p);
  if (p == kIeee) return;
  TORCH_CHECK(state.scalar_type() == at::kFloat, "the CUDA kernels run tf32, bfloat16 and float16 products "
              "(precision code ", p, ") on float32 inputs only, got ", state.scalar_type(), ": use precision ieee");
  const int sm = forced_paths.sm > 0 ? forced_paths.sm
                                     : 10 * device_attribute(cudaDevAttrComputeCapabilityMajor) +
                                           device_attribute(cudaDevAttrComputeCapabilityMinor);
  TORCH_CHECK(sm >= 80, "precision code ", p, " (tf32, bfloat16 or float16 products) needs tensor cores with "
              "TF32 and bfloat16 fragments, compute capability 8.0 or later; this device is sm_", sm,
              ": use precision ieee");
}

// The tensor-core path's layout for a call (true), or false where it does not run: precision ieee, the test
// hook, or not even a tile of 16 cells fits in a block's shared memory (then the FMA path runs, exact in float32).
bool tc_plan(const Dims& d, const Device& dev, bool backward, TcLayout* out) {
  if (d.rule.precision == kIeee || forced_paths.tensor_cores == 1) return false;
  const size_t elem = d.rule.precision == kTf32 ? sizeof(float) : 2;
  for (int M : {64, 32, 16}) {
    if (forced_paths.tile != 0 && M != forced_paths.tile) continue;
    const TcLayout t = tc_layout(d, M, elem, backward);
    if (t.bytes <= dev.shared) {
      *out = t;
      return true;
    }
  }
  return false;
}

// The tensor-core kernels' blocks over `tiles` tiles: as many as fit on the GPU at once (by shared memory and
// threads), each taking tiles in turn; the hook's backward_blocks caps them.
int64_t tc_blocks(const Dims& d, const Device& dev, const TcLayout& t) {
  const int64_t tiles = (d.N + t.M - 1) / t.M;
  const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(2048 / kTcThreads, dev.shared / t.bytes));
  const int64_t most = forced_paths.backward_blocks > 0 ? forced_paths.backward_blocks : dev.sms * per_sm;
  return std::max<int64_t>(1, std::min(tiles, most));
}

// Runs f(kind) with the fragment kind of the precision.
template <class F>
void with_tc_kind(int64_t precision, F&& f) {
  if (precision == kTf32) return f(TcTf32{});
  if (precision == kBf16) return f(TcBf16{});
  f(TcHalf{});
}

void check_cuda(const at::Tensor& state) {
  TORCH_CHECK(state.is_cuda(), "the CUDA kernel needs CUDA tensors");
  TORCH_CHECK(state.size(4) <= kMaxCudaState, "the CUDA kernel supports state size S <= ", kMaxCudaState, ", got ",
              state.size(4));
  check_kernel_dtype(state, "CUDA");
}

// The weights' tensors made contiguous, kept alive for the call; net<T>() their pointers.
struct NetTensors {
  at::Tensor wp, w1, b1, wh, bh, wo, bo, dead;
  NetTensors(const OpArgs& a, int64_t S)
      : wp(a.perception ? a.perception->contiguous() : at::Tensor()), w1(a.w1.contiguous()), b1(a.b1.contiguous()),
        wh(a.wh ? a.wh->contiguous() : at::Tensor()), bh(a.bh ? a.bh->contiguous() : at::Tensor()),
        wo(a.wo.contiguous()), bo(a.bo.contiguous()),
        dead(a.dead_state ? a.dead_state->contiguous() : at::zeros({S}, a.w1.options())) {}
  template <typename T>
  Net<T> net() const {
    auto p = [](const at::Tensor& t) -> const T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
    return {p(wp), p(w1), p(b1), p(wh), p(bh), p(wo), p(bo), p(dead)};
  }
};

const uint8_t* bytes_of(const at::Tensor& t) {
  return t.defined() ? static_cast<const uint8_t*>(t.data_ptr()) : nullptr;
}

// ---- the ops ----------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_forward_cuda(const at::Tensor& state, CUBECORE_OP_PARAMS,
                                                                     bool keep_trajectory) {
  const OpArgs a = decode_args(CUBECORE_OP_ARGS);
  check_propagate_args(state, a);
  check_cuda(state);
  const c10::cuda::CUDAGuard guard(state.device());
  check_cuda_precision(a, state);
  const ForcedPaths paths = forced_paths;
  const at::Tensor s0 = state.contiguous(), u = external.contiguous();
  const at::Tensor fires = fire_mask ? fire_mask->contiguous() : at::Tensor();
  const NetTensors weights(a, s0.size(4));
  const Dims d = make_dims(s0, a);
  const bool alive = a.alive();
  std::vector<int64_t> shape = {keep_trajectory ? steps + 1 : 1};
  for (int64_t v : s0.sizes()) shape.push_back(v);
  at::Tensor traj = at::empty(shape, s0.options());
  // The alive masks, a byte per cell and step: kept for the backward with the trajectory, else one step's.
  at::Tensor life = at::empty({alive ? (keep_trajectory ? steps : 1) : 0, d.B, d.X, d.Y, d.Z},
                              s0.options().dtype(at::kByte));
  if (d.N > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const Device dev = device_facts();
    TcLayout tl{};
    if (tc_plan(d, dev, false, &tl)) {  // float32 (check_cuda_precision): one tensor-core launch per step
      const Net<float> net = weights.template net<float>();
      const uint8_t* fire = bytes_of(fires);
      const unsigned int blocks = static_cast<unsigned int>(tc_blocks(d, dev, tl));
      at::Tensor spare = keep_trajectory ? at::Tensor() : at::empty_like(s0);
      float* spare_p = keep_trajectory ? nullptr : spare.data_ptr<float>();
      const float* cur = s0.data_ptr<float>();
      with_tc_kind(d.rule.precision, [&](auto kind) {
        using P = decltype(kind);
        allow_shared(tc_forward_step_kernel<P>, tl.bytes);
        for (int64_t t = 0; t < steps; ++t) {
          float* next = step_destination(traj.data_ptr<float>(), spare_p, d.N * d.S, t, steps, keep_trajectory);
          tc_forward_step_kernel<P><<<blocks, kTcThreads, tl.bytes, stream>>>(
              d, net, tl, cur, u.data_ptr<float>(), fire == nullptr ? nullptr : fire + t * d.N, next);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (alive) {
            uint8_t* life_t = life.data_ptr<uint8_t>() + (keep_trajectory ? t * d.N : 0);
            alive_kernel<float><<<blocks_of(d.N, kThreads), kThreads, 0, stream>>>(d, cur, next, life_t);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            bury_kernel<float><<<blocks_of(d.N, kThreads), kThreads, 0, stream>>>(d, net.dead, life_t, next);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          cur = next;
        }
      });
      if (keep_trajectory) traj[0].copy_(s0);
    } else AT_DISPATCH_FLOATING_TYPES(s0.scalar_type(), "propagate_forward_cuda", [&] {
      using T = scalar_t;
      const Net<T> net = weights.template net<T>();
      const uint8_t* fire = bytes_of(fires);
      with_cuda_state_length(d.S, paths.runtime_sizes, [&](auto state_length) {
        constexpr int L = decltype(state_length)::value;
        if (const int64_t threads = fused_threads<T>(d, dev)) {
          const size_t shared = fused_state_bytes<T>(d) + threads * row_bytes<T>(d);
          allow_shared(forward_fused_kernel<T, L>, shared);
          forward_fused_kernel<T, L><<<static_cast<unsigned int>(d.B), static_cast<unsigned int>(threads), shared,
                                       stream>>>(d, net, steps, keep_trajectory, s0.data_ptr<T>(), u.data_ptr<T>(),
                                                 fire, keep_trajectory && alive ? life.data_ptr<uint8_t>() : nullptr,
                                                 traj.data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        const RowPlan plan = plan_rows<T>(d, dev, threads_to_fill(dev, d.N, kThreads));
        const unsigned int blocks = blocks_of(d.N, plan.threads);
        const GlobalRows scratch = global_rows(d, plan, static_cast<int64_t>(blocks) * plan.threads, s0.options());
        allow_shared(forward_step_kernel<T, L>, plan.shared);
        at::Tensor spare = keep_trajectory ? at::Tensor() : at::empty_like(s0);
        T* spare_p = keep_trajectory ? nullptr : spare.data_ptr<T>();
        const T* cur = s0.data_ptr<T>();
        for (int64_t t = 0; t < steps; ++t) {
          T* next = step_destination(traj.data_ptr<T>(), spare_p, d.N * d.S, t, steps, keep_trajectory);
          forward_step_kernel<T, L><<<blocks, static_cast<unsigned int>(plan.threads), plan.shared, stream>>>(
              d, net, cur, u.data_ptr<T>(), fire == nullptr ? nullptr : fire + t * d.N, next,
              scratch.template values_ptr<T>(), scratch.slots_ptr());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (alive) {
            uint8_t* life_t = life.data_ptr<uint8_t>() + (keep_trajectory ? t * d.N : 0);
            alive_kernel<T><<<blocks_of(d.N, kThreads), kThreads, 0, stream>>>(d, cur, next, life_t);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            bury_kernel<T><<<blocks_of(d.N, kThreads), kThreads, 0, stream>>>(d, net.dead, life_t, next);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          cur = next;
        }
        if (keep_trajectory) traj[0].copy_(s0);  // the fused kernel writes it itself
      });
    });
  }
  auto outputs = forward_outputs(traj, keep_trajectory);
  if (!keep_trajectory) life = life.narrow(0, 0, 0);
  return {std::get<0>(outputs), std::get<1>(outputs), life};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
propagate_backward_cuda(const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& life,
                        CUBECORE_OP_PARAMS) {
  const OpArgs a = decode_args(CUBECORE_OP_ARGS);
  check_backward_args(grad_final, trajectory, life, a);
  check_cuda(trajectory[0]);
  const c10::cuda::CUDAGuard guard(trajectory.device());
  check_cuda_precision(a, trajectory);
  const ForcedPaths paths = forced_paths;
  const at::Tensor traj = trajectory.contiguous(), u = external.contiguous();
  const at::Tensor fires = fire_mask ? fire_mask->contiguous() : at::Tensor();
  const at::Tensor lives = a.alive() ? life.contiguous() : at::Tensor();
  const NetTensors weights(a, traj.size(5));
  const Dims d = make_dims(traj[0], a);
  const WeightOffsets o = weight_offsets(d);
  at::Tensor grad = grad_final.contiguous().clone();
  at::Tensor grad_next = at::empty_like(grad);
  at::Tensor grad_external = at::zeros_like(u);
  at::Tensor grad_weights = at::zeros({o.count}, traj.options());
  if (d.N > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const Device dev = device_facts();
    // What a cell's readers need from it: W1's input gradient dh1 (concat) or the perception's gradient.
    at::Tensor send = at::empty({d.N, d.F > 0 ? d.S * d.F : d.H1}, traj.options());
    TcLayout tl{};
    if (tc_plan(d, dev, true, &tl)) {  // float32 (check_cuda_precision): the tile kernel on tensor cores
      const Net<float> net = weights.template net<float>();
      const uint8_t *fire = bytes_of(fires), *lived = bytes_of(lives);
      const int64_t blocks = tc_blocks(d, dev, tl);
      at::Tensor partial = at::zeros({blocks, o.count}, traj.options());
      with_tc_kind(d.rule.precision, [&](auto kind) {
        using P = decltype(kind);
        allow_shared(tc_backward_tile_kernel<P>, tl.bytes);
        with_cuda_state_length(d.S, paths.runtime_sizes, [&](auto state_length) {
          constexpr int L = decltype(state_length)::value;
          for (int64_t t = steps - 1; t >= 0; --t) {
            const uint8_t* fire_t = fire == nullptr ? nullptr : fire + t * d.N;
            const uint8_t* life_t = lived == nullptr ? nullptr : lived + t * d.N;
            tc_backward_tile_kernel<P><<<static_cast<unsigned int>(blocks), kTcThreads, tl.bytes, stream>>>(
                d, net, tl, traj[t].data_ptr<float>(), u.data_ptr<float>(), fire_t, life_t, grad.data_ptr<float>(),
                grad_external.data_ptr<float>(), send.data_ptr<float>(), partial.data_ptr<float>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            backward_gather_kernel<float, L><<<blocks_of(d.N, kThreads), kThreads, 0, stream>>>(
                d, net, fire_t, life_t, send.data_ptr<float>(), grad.data_ptr<float>(), grad_next.data_ptr<float>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            std::swap(grad, grad_next);
          }
        });
      });
      reduce_partials_kernel<float><<<blocks_of(o.count, kThreads), kThreads, 0, stream>>>(
          o.count, blocks, partial.data_ptr<float>(), grad_weights.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else AT_DISPATCH_FLOATING_TYPES(traj.scalar_type(), "propagate_backward_cuda", [&] {
      using T = scalar_t;
      const Net<T> net = weights.template net<T>();
      const uint8_t *fire = bytes_of(fires), *lived = bytes_of(lives);
      with_cuda_state_length(d.S, paths.runtime_sizes, [&](auto state_length) {
        constexpr int L = decltype(state_length)::value;
        const RowPlan plan = plan_rows<T>(d, dev, threads_to_fill(dev, d.N, kThreads));
        const int64_t tiles = (d.N + plan.threads - 1) / plan.threads;
        const int64_t blocks =
            std::min<int64_t>(tiles, paths.backward_blocks > 0 ? paths.backward_blocks : 4 * dev.sms);
        const GlobalRows scratch = global_rows(d, plan, blocks * plan.threads, traj.options());
        at::Tensor partial = at::zeros({blocks, o.count}, traj.options());
        allow_shared(backward_tile_kernel<T, L>, plan.shared);
        for (int64_t t = steps - 1; t >= 0; --t) {
          const uint8_t* fire_t = fire == nullptr ? nullptr : fire + t * d.N;
          const uint8_t* life_t = lived == nullptr ? nullptr : lived + t * d.N;
          backward_tile_kernel<T, L><<<static_cast<unsigned int>(blocks), static_cast<unsigned int>(plan.threads),
                                       plan.shared, stream>>>(
              d, net, traj[t].data_ptr<T>(), u.data_ptr<T>(), fire_t, life_t, grad.data_ptr<T>(),
              grad_external.data_ptr<T>(), send.data_ptr<T>(), partial.data_ptr<T>(),
              scratch.template values_ptr<T>(), scratch.slots_ptr());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          backward_gather_kernel<T, L><<<blocks_of(d.N, kThreads), kThreads, 0, stream>>>(
              d, net, fire_t, life_t, send.data_ptr<T>(), grad.data_ptr<T>(), grad_next.data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          std::swap(grad, grad_next);
        }
        reduce_partials_kernel<T><<<blocks_of(o.count, kThreads), kThreads, 0, stream>>>(
            o.count, blocks, partial.data_ptr<T>(), grad_weights.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  auto part = [&](int64_t offset, std::vector<int64_t> sizes) {
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    return grad_weights.narrow(0, offset, numel).view(sizes).clone();
  };
  const at::Tensor none = at::empty({0}, traj.options());
  const int64_t Hl = d.H2 > 0 ? d.H2 : d.H1;
  return {grad,
          grad_external,
          d.F > 0 ? part(o.wp, {d.S, d.F, d.K}) : none,
          part(o.w1, {d.H1, d.In}),
          part(o.b1, {d.H1}),
          d.H2 > 0 ? part(o.wh, {d.H2, d.H1}) : none,
          d.H2 > 0 ? part(o.bh, {d.H2}) : none,
          part(o.wo, {d.S, Hl}),
          part(o.bo, {d.S})};
}

}  // namespace

TORCH_LIBRARY_IMPL(cubecore, CUDA, m) {
  m.impl("propagate_forward", &propagate_forward_cuda);
  m.impl("propagate_backward", &propagate_backward_cuda);
}

}  // namespace cubecore

// The test hook: overrides the kernels' choices for the following calls (all zeros: back to the choices the
// sizes make).  runtime_sizes: the L = 0 kernels for every size; global_rows: scratch rows in global memory;
// forward: 1 per step, 2 fused wherever it fits; backward_blocks: at most this many blocks in the backward (and
// in the tensor-core forward); tensor_cores: 1 runs the FMA path whatever the call's precision; tile: the
// tensor-core path's cells per tile (16, 32 or 64); sm: the compute capability the precision check sees.
extern "C" void cubecore_cuda_force_paths(int runtime_sizes, int global_rows, int forward, int64_t backward_blocks,
                                          int tensor_cores, int tile, int sm) {
  cubecore::forced_paths = {runtime_sizes, global_rows, forward, backward_blocks, tensor_cores, tile, sm};
}
