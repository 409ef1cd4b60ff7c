// Op schemas and CPU kernels of the lattice propagation op.
//
// The rule (see cubecore/reference.py): every cell gathers x = [n1..n6, s, u] (7S + E values), computes
// h = act(W1 x + b1), c = tanh(W2 h + b2), and its new state is c ("replace") or s + step_size * c
// ("residual").  The CPU kernels work on tiles of kLanes consecutive cells, transposed so that the cell is
// the innermost (SIMD) index: every matrix product below is a loop over kLanes that the compiler vectorises.
//
// The forward keeps the T + 1 states when asked (for the backward) and nothing else; the backward
// recomputes each step's hidden activations from the saved state of that step.

#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cell_rule.h"

extern "C" {
// An empty `cubecore._C` module: importing it loads this library, whose static initialisers register the op.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
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
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == 7 * S + E, "w1 must be [H, 7*S+E] = [H, ", 7 * S + E, "], got ",
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

namespace {

constexpr int kLanes = 32;  // cells per tile: the SIMD index of every loop below
constexpr int kVec = 16;    // lanes kept apart in the weight-gradient accumulators (one AVX-512 register)
static_assert(kLanes % kVec == 0, "a tile must be a whole number of accumulator vectors");

// tanh for float as a clamped rational approximation (Eigen's generic_fast_tanh_float): branch-free, so
// loops over it vectorise, and within a few ulp of std::tanh.  Doubles use std::tanh.
inline float tanh_fast(float a) {
  const float x = std::max(-7.90531110763549805f, std::min(7.90531110763549805f, a));
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return std::abs(a) < 0.0004f ? a : p / q;
}
inline double tanh_fast(double a) { return std::tanh(a); }

template <typename T>
inline void tanh_inplace(T* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = tanh_fast(v[i]);
}

template <typename T>
inline void activate_inplace(T* v, int64_t n, int64_t activation) {
  if (activation == kTanh) {
    tanh_inplace(v, n);
  } else if (activation == kRelu) {
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] > T(0) ? v[i] : T(0);
  } else {  // sigmoid(x) = (1 + tanh(x / 2)) / 2
    for (int64_t i = 0; i < n; ++i) v[i] = T(0.5) + T(0.5) * tanh_fast(T(0.5) * v[i]);
  }
}

// grad *= act'(pre-activation), written in terms of the activation's output a.
template <typename T>
inline void activation_backward_inplace(T* grad, const T* a, int64_t n, int64_t activation) {
  if (activation == kTanh) {
    for (int64_t i = 0; i < n; ++i) grad[i] *= T(1) - a[i] * a[i];
  } else if (activation == kRelu) {
    for (int64_t i = 0; i < n; ++i) grad[i] = a[i] > T(0) ? grad[i] : T(0);
  } else {
    for (int64_t i = 0; i < n; ++i) grad[i] *= a[i] * (T(1) - a[i]);
  }
}

// out[r][l] = bias[r] + sum_k W[r][k] * in[k][l] for a tile: W is [R, Kd] row-major, in is [Kd][kLanes],
// out is [R][kLanes].  Rows are taken four at a time so that each loaded input row feeds four accumulators.
template <typename T>
inline void matmul_tile(const T* W, const T* bias, const T* in, T* out, int64_t R, int64_t Kd) {
  constexpr int L = kLanes;
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    T a0[L], a1[L], a2[L], a3[L];
    const T c0 = bias ? bias[r] : T(0), c1 = bias ? bias[r + 1] : T(0);
    const T c2 = bias ? bias[r + 2] : T(0), c3 = bias ? bias[r + 3] : T(0);
    for (int l = 0; l < L; ++l) {
      a0[l] = c0;
      a1[l] = c1;
      a2[l] = c2;
      a3[l] = c3;
    }
    const T* w0 = W + r * Kd;
    const T* w1 = w0 + Kd;
    const T* w2 = w1 + Kd;
    const T* w3 = w2 + Kd;
    for (int64_t k = 0; k < Kd; ++k) {
      const T* x = in + k * L;
      const T v0 = w0[k], v1 = w1[k], v2 = w2[k], v3 = w3[k];
      for (int l = 0; l < L; ++l) {
        a0[l] += v0 * x[l];
        a1[l] += v1 * x[l];
        a2[l] += v2 * x[l];
        a3[l] += v3 * x[l];
      }
    }
    for (int l = 0; l < L; ++l) {
      out[r * L + l] = a0[l];
      out[(r + 1) * L + l] = a1[l];
      out[(r + 2) * L + l] = a2[l];
      out[(r + 3) * L + l] = a3[l];
    }
  }
  for (; r < R; ++r) {
    T a[L];
    const T c = bias ? bias[r] : T(0);
    for (int l = 0; l < L; ++l) a[l] = c;
    const T* w = W + r * Kd;
    for (int64_t k = 0; k < Kd; ++k) {
      const T v = w[k];
      const T* x = in + k * L;
      for (int l = 0; l < L; ++l) a[l] += v * x[l];
    }
    for (int l = 0; l < L; ++l) out[r * L + l] = a[l];
  }
}

// acc[r][k][v] += sum over the tile's lanes l = v (mod kVec) of a[r][l] * b[k][l]: a weight gradient kept as
// kVec partial sums, reduced once at the very end.  Four k at a time give four independent FMA chains.
template <typename T>
inline void outer_accumulate_tile(T* acc, const T* a, const T* b, int64_t R, int64_t Kd) {
  constexpr int L = kLanes, V = kVec;
  for (int64_t r = 0; r < R; ++r) {
    const T* ar = a + r * L;
    T* accr = acc + r * Kd * V;
    int64_t k = 0;
    for (; k + 4 <= Kd; k += 4) {
      T s0[V], s1[V], s2[V], s3[V];
      for (int v = 0; v < V; ++v) {
        s0[v] = accr[k * V + v];
        s1[v] = accr[(k + 1) * V + v];
        s2[v] = accr[(k + 2) * V + v];
        s3[v] = accr[(k + 3) * V + v];
      }
      for (int base = 0; base < L; base += V) {
        for (int v = 0; v < V; ++v) {
          const T x = ar[base + v];
          s0[v] += x * b[k * L + base + v];
          s1[v] += x * b[(k + 1) * L + base + v];
          s2[v] += x * b[(k + 2) * L + base + v];
          s3[v] += x * b[(k + 3) * L + base + v];
        }
      }
      for (int v = 0; v < V; ++v) {
        accr[k * V + v] = s0[v];
        accr[(k + 1) * V + v] = s1[v];
        accr[(k + 2) * V + v] = s2[v];
        accr[(k + 3) * V + v] = s3[v];
      }
    }
    for (; k < Kd; ++k) {
      T s[V];
      for (int v = 0; v < V; ++v) s[v] = accr[k * V + v];
      for (int base = 0; base < L; base += V)
        for (int v = 0; v < V; ++v) s[v] += ar[base + v] * b[k * L + base + v];
      for (int v = 0; v < V; ++v) accr[k * V + v] = s[v];
    }
  }
}

struct Geometry {
  int64_t B, X, Y, Z, S, E, H, K;
  int64_t cells;  // X * Y * Z
  int64_t N;      // B * cells
  int64_t boundary, activation, update;
  double step_size;
  std::vector<int64_t> neighbours;  // [cells][kSlots]: the cell each slot reads (-1: zeros), the same per sample

  Geometry(const at::Tensor& state, const at::Tensor& external, const at::Tensor& w1, int64_t boundary_,
           int64_t activation_, int64_t update_, double step_size_)
      : B(state.size(0)), X(state.size(1)), Y(state.size(2)), Z(state.size(3)), S(state.size(4)),
        E(external.size(4)), H(w1.size(0)), K(w1.size(1)), boundary(boundary_), activation(activation_),
        update(update_), step_size(step_size_) {
    cells = X * Y * Z;
    N = B * cells;
    neighbours.resize(cells * kSlots);
    for (int64_t x = 0; x < X; ++x)
      for (int64_t y = 0; y < Y; ++y)
        for (int64_t z = 0; z < Z; ++z)
          for (int slot = 0; slot < kSlots; ++slot)
            neighbours[((x * Y + y) * Z + z) * kSlots + slot] = neighbour_index(x, y, z, slot, X, Y, Z, boundary);
  }
  int64_t tiles() const { return (N + kLanes - 1) / kLanes; }
};

// Gathers the inputs x = [n1..n6, s, u] of the kLanes cells starting at n0 into xin[K][kLanes]
// (lanes past the last cell read zeros).
template <typename T>
void gather_tile(const Geometry& g, const T* state, const T* external, int64_t n0, T* xin) {
  constexpr int L = kLanes;
  const int64_t S = g.S, E = g.E;
  for (int l = 0; l < L; ++l) {
    const int64_t n = n0 + l;
    if (n >= g.N) {
      for (int64_t k = 0; k < g.K; ++k) xin[k * L + l] = T(0);
      continue;
    }
    const int64_t b = n / g.cells;
    const int64_t* reads = g.neighbours.data() + (n - b * g.cells) * kSlots;
    const T* sample = state + b * g.cells * S;
    for (int slot = 0; slot < kSlots; ++slot) {
      const int64_t src = reads[slot];
      T* dst = xin + slot * S * L + l;
      if (src < 0) {
        for (int64_t c = 0; c < S; ++c) dst[c * L] = T(0);
      } else {
        const T* p = sample + src * S;
        for (int64_t c = 0; c < S; ++c) dst[c * L] = p[c];
      }
    }
    const T* u = external + n * E;
    T* dst = xin + kSlots * S * L + l;
    for (int64_t e = 0; e < E; ++e) dst[e * L] = u[e];
  }
}

// Per-tile scratch: inputs, hidden activations and cell changes (and their gradients for the backward).
template <typename T>
struct TileScratch {
  std::vector<T> xin, hid, chg, dhid;
  explicit TileScratch(const Geometry& g, bool backward)
      : xin(g.K * kLanes), hid(g.H * kLanes), chg(g.S * kLanes) {
    if (backward) {
      dhid.resize(g.H * kLanes);
    }
  }
};

// Forward of one tile up to the cell change: fills scratch.xin, scratch.hid (activated) and scratch.chg
// (after tanh).
template <typename T>
inline void forward_tile(const Geometry& g, const T* state, const T* external, const T* w1, const T* b1,
                         const T* w2, const T* b2, int64_t n0, TileScratch<T>& s) {
  gather_tile(g, state, external, n0, s.xin.data());
  matmul_tile(w1, b1, s.xin.data(), s.hid.data(), g.H, g.K);
  activate_inplace(s.hid.data(), g.H * kLanes, g.activation);
  matmul_tile(w2, b2, s.hid.data(), s.chg.data(), g.S, g.H);
  tanh_inplace(s.chg.data(), g.S * kLanes);
}

template <typename T>
void forward_step_cpu(const Geometry& g, const T* state, const T* external, const T* w1, const T* b1,
                      const T* w2, const T* b2, T* out) {
  at::parallel_for(0, g.tiles(), 1, [&](int64_t begin, int64_t end) {
    TileScratch<T> s(g, /*backward=*/false);
    const T step = static_cast<T>(g.step_size);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kLanes;
      forward_tile(g, state, external, w1, b1, w2, b2, n0, s);
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, g.N - n0));
      for (int l = 0; l < lanes; ++l) {
        const int64_t n = n0 + l;
        for (int64_t c = 0; c < g.S; ++c) {
          const T v = s.chg[c * kLanes + l];
          out[n * g.S + c] = g.update == kReplace ? v : state[n * g.S + c] + step * v;
        }
      }
    }
  });
}

at::Tensor propagate_forward_cpu(const at::Tensor& state, const at::Tensor& external, const at::Tensor& w1,
                                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t steps,
                                 int64_t boundary, int64_t activation, int64_t update, double step_size,
                                 bool keep_trajectory) {
  check_propagate_args(state, external, w1, b1, w2, b2, steps, boundary, activation, update);
  TORCH_CHECK(state.device().is_cpu(), "propagate_forward_cpu: tensors must be on the CPU");
  TORCH_CHECK(state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble,
              "the CPU kernel supports float32 and float64, got ", state.scalar_type());
  const at::Tensor s0 = state.contiguous(), u = external.contiguous();
  const at::Tensor W1 = w1.contiguous(), B1 = b1.contiguous(), W2 = w2.contiguous(), B2 = b2.contiguous();
  const Geometry g(s0, u, W1, boundary, activation, update, step_size);

  std::vector<int64_t> shape = {keep_trajectory ? steps + 1 : 1};
  for (int64_t d : s0.sizes()) shape.push_back(d);
  at::Tensor traj = at::empty(shape, s0.options());
  // Without a trajectory, two buffers alternate; the last step writes into the output.
  at::Tensor spare = keep_trajectory ? at::Tensor() : at::empty_like(s0);

  AT_DISPATCH_FLOATING_TYPES(s0.scalar_type(), "propagate_forward_cpu", [&] {
    const scalar_t* cur = s0.data_ptr<scalar_t>();
    for (int64_t t = 0; t < steps; ++t) {
      scalar_t* next;
      if (keep_trajectory) {
        next = traj[t + 1].data_ptr<scalar_t>();
      } else {
        const bool last = ((steps - 1 - t) % 2) == 0;  // the buffer written by the final step is traj[0]
        next = last ? traj[0].data_ptr<scalar_t>() : spare.data_ptr<scalar_t>();
      }
      forward_step_cpu<scalar_t>(g, cur, u.data_ptr<scalar_t>(), W1.data_ptr<scalar_t>(), B1.data_ptr<scalar_t>(),
                                 W2.data_ptr<scalar_t>(), B2.data_ptr<scalar_t>(), next);
      cur = next;
    }
    if (keep_trajectory) traj[0].copy_(s0);
  });
  return traj;
}

// Readers of every cell, for the backward's gather: for slot k < 6, the cell that reads this one through k
// (-1: none) and whether the cell reads itself through k (a reflecting edge).  [cells][6][2], same per sample.
std::vector<int64_t> slot_readers(const Geometry& g) {
  std::vector<int64_t> readers(g.cells * 6 * 2);
  const int64_t extent[3] = {g.X, g.Y, g.Z};
  for (int64_t x = 0; x < g.X; ++x)
    for (int64_t y = 0; y < g.Y; ++y)
      for (int64_t z = 0; z < g.Z; ++z) {
        const int64_t cell = (x * g.Y + y) * g.Z + z;
        for (int slot = 0; slot < 6; ++slot) {
          const int axis = slot / 2;
          int64_t c3[3] = {x, y, z};
          int64_t other;
          bool self;
          readers_through_slot(c3[axis], (slot & 1) ? 1 : -1, extent[axis], g.boundary, &other, &self);
          c3[axis] = other;
          readers[(cell * 6 + slot) * 2] = other < 0 ? -1 : (c3[0] * g.Y + c3[1]) * g.Z + c3[2];
          readers[(cell * 6 + slot) * 2 + 1] = self ? 1 : 0;
        }
      }
  return readers;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_backward_cpu(
    const at::Tensor& grad_trajectory, const at::Tensor& trajectory, const at::Tensor& external,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t steps,
    int64_t boundary, int64_t activation, int64_t update, double step_size) {
  TORCH_CHECK(trajectory.dim() == 6 && trajectory.size(0) == steps + 1,
              "trajectory must be [steps + 1, B, X, Y, Z, S]; the forward must keep its trajectory");
  TORCH_CHECK(grad_trajectory.sizes() == trajectory.sizes(), "grad_trajectory must match trajectory");
  check_propagate_args(trajectory[0], external, w1, b1, w2, b2, steps, boundary, activation, update);
  TORCH_CHECK(trajectory.device().is_cpu(), "propagate_backward_cpu: tensors must be on the CPU");
  const at::Tensor traj = trajectory.contiguous(), gtraj = grad_trajectory.contiguous(), u = external.contiguous();
  const at::Tensor W1 = w1.contiguous(), B1 = b1.contiguous(), W2 = w2.contiguous(), B2 = b2.contiguous();
  const Geometry g(traj[0], u, W1, boundary, activation, update, step_size);
  const int64_t S = g.S, H = g.H, K = g.K, E = g.E, N = g.N;
  const std::vector<int64_t> readers = slot_readers(g);

  // W2^T [H, S] maps the change's gradient to the hidden layer; "pull" weights map the hidden gradients of
  // a cell's seven readers (slot-major, [7H]) to its state gradient [S]: pull[c][k*H + j] = W1[j][k*S + c].
  // The external part of W1, transposed, gives the external input's gradient.
  const at::Tensor W2t = W2.t().contiguous();
  const at::Tensor pull =
      W1.narrow(1, 0, kSlots * S).view({H, kSlots, S}).permute({2, 1, 0}).reshape({S, kSlots * H}).contiguous();
  const at::Tensor W1ext_t = W1.narrow(1, kSlots * S, E).t().contiguous();

  at::Tensor grad = gtraj[steps].clone();
  at::Tensor grad_next = at::empty_like(grad);
  at::Tensor dhidden = at::empty({N, H}, traj.options());  // d loss / d (pre-activation) of one step
  at::Tensor grad_external = at::zeros_like(u);
  // Weight gradients: one accumulator per thread, kept as kVec partial sums, reduced once at the end.
  const int64_t threads = at::get_num_threads();
  const int64_t acc_size = (H * K + H + S * H + S) * kVec;
  at::Tensor acc = at::zeros({threads, acc_size}, traj.options());

  AT_DISPATCH_FLOATING_TYPES(traj.scalar_type(), "propagate_backward_cpu", [&] {
    using T = scalar_t;
    const T* w1p = W1.data_ptr<T>();
    const T* b1p = B1.data_ptr<T>();
    const T* w2p = W2.data_ptr<T>();
    const T* b2p = B2.data_ptr<T>();
    const T* w2t = W2t.data_ptr<T>();
    const T* pullp = pull.data_ptr<T>();
    const T* w1e = W1ext_t.data_ptr<T>();
    const T* up = u.data_ptr<T>();
    T* dh = dhidden.data_ptr<T>();
    T* gext = grad_external.data_ptr<T>();
    const T change_scale = update == kReplace ? T(1) : static_cast<T>(step_size);
    for (int64_t t = steps - 1; t >= 0; --t) {
      const T* st = traj[t].data_ptr<T>();
      const T* gp = grad.data_ptr<T>();
      // Pass 1: per cell, recompute the step, push the gradient through tanh, W2 and act, accumulate the
      // weight gradients, and keep the pre-activation gradient.
      at::parallel_for(0, g.tiles(), 1, [&](int64_t begin, int64_t end) {
        TileScratch<T> s(g, /*backward=*/true);
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid < threads, "unexpected thread number");
        T* acc_w1 = acc.data_ptr<T>() + tid * acc_size;
        T* acc_b1 = acc_w1 + H * K * kVec;
        T* acc_w2 = acc_b1 + H * kVec;
        T* acc_b2 = acc_w2 + S * H * kVec;
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t n0 = tile * kLanes;
          const int lanes = static_cast<int>(std::min<int64_t>(kLanes, N - n0));
          forward_tile(g, st, up, w1p, b1p, w2p, b2p, n0, s);
          T* dchg = s.chg.data();  // becomes d loss / d (pre-tanh change): (1 - c^2) * scale * grad
          for (int64_t c = 0; c < S; ++c) {
            for (int l = 0; l < kLanes; ++l) {
              const T cv = dchg[c * kLanes + l];
              const T gv = l < lanes ? gp[(n0 + l) * S + c] : T(0);
              dchg[c * kLanes + l] = (T(1) - cv * cv) * change_scale * gv;
            }
          }
          for (int64_t c = 0; c < S; ++c)
            for (int l = 0; l < kLanes; ++l) acc_b2[c * kVec + l % kVec] += dchg[c * kLanes + l];
          outer_accumulate_tile(acc_w2, dchg, s.hid.data(), S, H);
          matmul_tile<T>(w2t, nullptr, dchg, s.dhid.data(), H, S);
          activation_backward_inplace(s.dhid.data(), s.hid.data(), H * kLanes, g.activation);
          for (int64_t j = 0; j < H; ++j)
            for (int l = 0; l < kLanes; ++l) acc_b1[j * kVec + l % kVec] += s.dhid[j * kLanes + l];
          outer_accumulate_tile(acc_w1, s.dhid.data(), s.xin.data(), H, K);
          for (int l = 0; l < lanes; ++l)
            for (int64_t j = 0; j < H; ++j) dh[(n0 + l) * H + j] = s.dhid[j * kLanes + l];
        }
      });
      // Pass 2: per cell, pull the hidden gradients of the cells that read it (and of itself) back through
      // W1, add the residual path and any gradient on the trajectory at t.
      const T* carry = gtraj[t].data_ptr<T>();
      T* out = grad_next.data_ptr<T>();
      at::parallel_for(0, g.tiles(), 1, [&](int64_t begin, int64_t end) {
        std::vector<T> gathered(kSlots * H * kLanes), sgrad(S * kLanes), egrad(E * kLanes);
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t n0 = tile * kLanes;
          const int lanes = static_cast<int>(std::min<int64_t>(kLanes, N - n0));
          for (int l = 0; l < kLanes; ++l) {
            const int64_t n = n0 + l;
            if (l >= lanes) {
              for (int64_t r = 0; r < kSlots * H; ++r) gathered[r * kLanes + l] = T(0);
              continue;
            }
            const int64_t b = n / g.cells;
            const int64_t cell = n - b * g.cells;
            const T* own = dh + n * H;
            for (int slot = 0; slot < 6; ++slot) {
              const int64_t other = readers[(cell * 6 + slot) * 2];
              const bool self = readers[(cell * 6 + slot) * 2 + 1] != 0;
              const T* src = other >= 0 ? dh + (b * g.cells + other) * H : nullptr;
              T* dst = gathered.data() + slot * H * kLanes + l;
              for (int64_t j = 0; j < H; ++j)
                dst[j * kLanes] = (src ? src[j] : T(0)) + (self ? own[j] : T(0));
            }
            T* dst = gathered.data() + 6 * H * kLanes + l;
            for (int64_t j = 0; j < H; ++j) dst[j * kLanes] = own[j];
          }
          matmul_tile<T>(pullp, nullptr, gathered.data(), sgrad.data(), S, kSlots * H);
          if (E > 0) matmul_tile<T>(w1e, nullptr, gathered.data() + 6 * H * kLanes, egrad.data(), E, H);
          for (int l = 0; l < lanes; ++l) {
            const int64_t n = n0 + l;
            for (int64_t c = 0; c < S; ++c) {
              const T residual = update == kResidual ? gp[n * S + c] : T(0);
              out[n * S + c] = sgrad[c * kLanes + l] + residual + carry[n * S + c];
            }
            for (int64_t e = 0; e < E; ++e) gext[n * E + e] += egrad[e * kLanes + l];
          }
        }
      });
      std::swap(grad, grad_next);
    }
  });

  // Reduce the per-thread partial sums.
  at::Tensor sums = acc.sum(0).view({-1, kVec}).sum(1);
  int64_t off = 0;
  at::Tensor grad_w1 = sums.narrow(0, off, H * K).view({H, K}).clone();
  off += H * K;
  at::Tensor grad_b1 = sums.narrow(0, off, H).clone();
  off += H;
  at::Tensor grad_w2 = sums.narrow(0, off, S * H).view({S, H}).clone();
  off += S * H;
  at::Tensor grad_b2 = sums.narrow(0, off, S).clone();
  return {grad, grad_external, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY(cubecore, m) {
  m.def(
      "propagate_forward(Tensor state, Tensor external, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "int steps, int boundary, int activation, int update, float step_size, bool keep_trajectory) -> Tensor");
  m.def(
      "propagate_backward(Tensor grad_trajectory, Tensor trajectory, Tensor external, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2, int steps, int boundary, int activation, int update, float step_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cubecore, CPU, m) {
  m.impl("propagate_forward", &propagate_forward_cpu);
  m.impl("propagate_backward", &propagate_backward_cpu);
}

}  // namespace cubecore
