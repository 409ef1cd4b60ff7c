// Op schemas and CPU kernels of the lattice propagation op.
//
// The rule (see cubecore/reference.py): every cell gathers x = [n1..n6, s, u] (7S + E values), computes
// h = act(W1 x + b1), c = tanh(W2 h + b2), and its new state is c ("replace") or s + step_size * c
// ("residual").  The CPU kernels work on tiles of cells, one row of inputs per cell, and vectorise over
// the output features of every matrix product.
//
// The forward keeps the T + 1 states when asked (for the backward) and nothing else; the backward
// recomputes each step's hidden activations from the saved state of that step.

#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
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

// Shared with the CUDA file: the checks on the backward op's arguments.
void check_backward_args(const at::Tensor& grad_trajectory, const at::Tensor& trajectory, const at::Tensor& external,
                         const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                         int64_t steps, int64_t boundary, int64_t activation, int64_t update) {
  TORCH_CHECK(trajectory.dim() == 6 && trajectory.size(0) == steps + 1,
              "trajectory must be [steps + 1, B, X, Y, Z, S]; the forward must keep its trajectory");
  TORCH_CHECK(grad_trajectory.sizes() == trajectory.sizes(), "grad_trajectory must match trajectory");
  check_propagate_args(trajectory[0], external, w1, b1, w2, b2, steps, boundary, activation, update);
}

namespace {

// ---- small dense building blocks ----------------------------------------------------------------------------
//
// Cells are processed in tiles of kTile, cell-major: a tile's inputs are a [kTile][K] block whose rows are
// copied straight from the neighbours' states.  Feature dimensions (hidden H, state S, external E) are padded
// to whole SIMD vectors of 32 bytes, so every product is a loop of vector FMAs over the output features, with
// the accumulators of a few cells held in registers.

constexpr int64_t kTile = 32;
// Vector accumulators a block keeps in registers: half the register file (32 with AVX-512VL, else 16).
#ifdef __AVX512VL__
constexpr int kAccumulators = 16;
#else
constexpr int kAccumulators = 8;
#endif

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int width = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int width = 4;
};

template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename T>
inline int64_t padded(int64_t n) {
  constexpr int W = Vec<T>::width;
  return (n + W - 1) / W * W;
}

// out[c][0:RV*W] = bias + sum_k in[c * ld + k] * WT[k][0:RV*W], for c < C.  NB cells at a time, so that
// NB * RV accumulators stay in registers.
template <typename T, int RV, int NB>
inline void matmul_block(const T* in, int64_t ld, int64_t Kd, const T* WT, const T* bias, T* out) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  V acc[NB][RV];
#pragma GCC unroll 16
  for (int r = 0; r < RV; ++r) {
    const V b = bias ? vload(bias + r * W) : V{};
#pragma GCC unroll 16
    for (int i = 0; i < NB; ++i) acc[i][r] = b;
  }
  for (int64_t k = 0; k < Kd; ++k) {
    V w[RV];
#pragma GCC unroll 16
    for (int r = 0; r < RV; ++r) w[r] = vload(WT + k * RV * W + r * W);
#pragma GCC unroll 16
    for (int i = 0; i < NB; ++i) {
      const T x = in[i * ld + k];
#pragma GCC unroll 16
      for (int r = 0; r < RV; ++r) acc[i][r] += w[r] * x;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 16
    for (int r = 0; r < RV; ++r) vstore(out + i * RV * W + r * W, acc[i][r]);
}

template <typename T, int RV>
void matmul_rows_fixed(const T* in, int64_t ld, int64_t C, int64_t Kd, const T* WT, const T* bias, T* out) {
  constexpr int NB = RV >= kAccumulators ? 1 : kAccumulators / RV;
  constexpr int W = Vec<T>::width;
  int64_t c = 0;
  for (; c + NB <= C; c += NB) matmul_block<T, RV, NB>(in + c * ld, ld, Kd, WT, bias, out + c * RV * W);
  for (; c < C; ++c) matmul_block<T, RV, 1>(in + c * ld, ld, Kd, WT, bias, out + c * RV * W);
}

// out [C][R] = bias [R] + in [C][Kd] (row stride ld) @ WT [Kd][R]; R a multiple of the vector width.
template <typename T>
void matmul_rows(const T* in, int64_t ld, int64_t C, int64_t Kd, const T* WT, const T* bias, T* out, int64_t R) {
  switch (R / Vec<T>::width) {
    case 1: return matmul_rows_fixed<T, 1>(in, ld, C, Kd, WT, bias, out);
    case 2: return matmul_rows_fixed<T, 2>(in, ld, C, Kd, WT, bias, out);
    case 3: return matmul_rows_fixed<T, 3>(in, ld, C, Kd, WT, bias, out);
    case 4: return matmul_rows_fixed<T, 4>(in, ld, C, Kd, WT, bias, out);
    case 8: return matmul_rows_fixed<T, 8>(in, ld, C, Kd, WT, bias, out);
    default:
      for (int64_t c = 0; c < C; ++c) {
        T* o = out + c * R;
        for (int64_t r = 0; r < R; ++r) o[r] = bias ? bias[r] : T(0);
        for (int64_t k = 0; k < Kd; ++k) {
          const T x = in[c * ld + k];
          const T* w = WT + k * R;
          for (int64_t r = 0; r < R; ++r) o[r] += w[r] * x;
        }
      }
  }
}

// G[k][0:RV*W] += sum_c in[c * ld + k] * D[c][0:RV*W]: a weight gradient, KB rows of G at a time in registers.
template <typename T, int RV>
void accumulate_outer_fixed(const T* in, int64_t ld, int64_t C, int64_t Kd, const T* D, T* G) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  constexpr int KB = RV >= kAccumulators ? 1 : kAccumulators / RV;
  int64_t k0 = 0;
  auto block = [&](auto kb_const) {
    constexpr int NK = decltype(kb_const)::value;
    V acc[NK][RV];
#pragma GCC unroll 16
    for (int i = 0; i < NK; ++i)
#pragma GCC unroll 16
      for (int r = 0; r < RV; ++r) acc[i][r] = vload(G + (k0 + i) * RV * W + r * W);
    for (int64_t c = 0; c < C; ++c) {
      V d[RV];
#pragma GCC unroll 16
      for (int r = 0; r < RV; ++r) d[r] = vload(D + c * RV * W + r * W);
#pragma GCC unroll 16
      for (int i = 0; i < NK; ++i) {
        const T x = in[c * ld + k0 + i];
#pragma GCC unroll 16
        for (int r = 0; r < RV; ++r) acc[i][r] += d[r] * x;
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < NK; ++i)
#pragma GCC unroll 16
      for (int r = 0; r < RV; ++r) vstore(G + (k0 + i) * RV * W + r * W, acc[i][r]);
  };
  for (; k0 + KB <= Kd; k0 += KB) block(std::integral_constant<int, KB>{});
  for (; k0 < Kd; ++k0) block(std::integral_constant<int, 1>{});
}

// G [Kd][R] += in[C][Kd]^T (row stride ld) @ D [C][R]; R a multiple of the vector width.
template <typename T>
void accumulate_outer(const T* in, int64_t ld, int64_t C, int64_t Kd, const T* D, T* G, int64_t R) {
  switch (R / Vec<T>::width) {
    case 1: return accumulate_outer_fixed<T, 1>(in, ld, C, Kd, D, G);
    case 2: return accumulate_outer_fixed<T, 2>(in, ld, C, Kd, D, G);
    case 3: return accumulate_outer_fixed<T, 3>(in, ld, C, Kd, D, G);
    case 4: return accumulate_outer_fixed<T, 4>(in, ld, C, Kd, D, G);
    case 8: return accumulate_outer_fixed<T, 8>(in, ld, C, Kd, D, G);
    default:
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < Kd; ++k) {
          const T x = in[c * ld + k];
          T* g = G + k * R;
          const T* d = D + c * R;
          for (int64_t r = 0; r < R; ++r) g[r] += d[r] * x;
        }
  }
}

// ---- activations ------------------------------------------------------------------------------------------

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

// ---- the lattice ------------------------------------------------------------------------------------------

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
  int64_t tiles() const { return (N + kTile - 1) / kTile; }
};

// The weights rearranged for the kernels: transposed, with feature dimensions padded to whole vectors.
template <typename T>
struct PackedWeights {
  int64_t Hp, Sp, Ep;
  at::Tensor w1t;   // [K][Hp]:  W1^T
  at::Tensor b1;    // [Hp]
  at::Tensor w2t;   // [Hp][Sp]: W2^T
  at::Tensor b2;    // [Sp]
  at::Tensor w2;    // [Sp][Hp]: W2 (backward: change gradient -> hidden gradient)
  at::Tensor pull;  // [kSlots * Hp][Sp]: pull[k * Hp + j][c] = W1[j][k * S + c] (backward: hidden -> state)
  at::Tensor w1e;   // [Hp][Ep]: pull[j][e] = W1[j][7S + e] (backward: hidden -> external)

  PackedWeights(const Geometry& g, const at::Tensor& W1, const at::Tensor& B1, const at::Tensor& W2,
                const at::Tensor& B2)
      : Hp(padded<T>(g.H)), Sp(padded<T>(g.S)), Ep(padded<T>(std::max<int64_t>(g.E, 1))) {
    const int64_t H = g.H, S = g.S, E = g.E;
    auto opts = W1.options();
    w1t = at::zeros({g.K, Hp}, opts);
    w1t.narrow(1, 0, H).copy_(W1.t());
    b1 = at::zeros({Hp}, opts);
    b1.narrow(0, 0, H).copy_(B1);
    w2t = at::zeros({Hp, Sp}, opts);
    w2t.narrow(0, 0, H).narrow(1, 0, S).copy_(W2.t());
    b2 = at::zeros({Sp}, opts);
    b2.narrow(0, 0, S).copy_(B2);
    w2 = at::zeros({Sp, Hp}, opts);
    w2.narrow(0, 0, S).narrow(1, 0, H).copy_(W2);
    pull = at::zeros({kSlots, Hp, Sp}, opts);
    pull.narrow(1, 0, H).narrow(2, 0, S).copy_(W1.narrow(1, 0, kSlots * S).view({H, kSlots, S}).permute({1, 0, 2}));
    pull = pull.view({kSlots * Hp, Sp});
    w1e = at::zeros({Hp, Ep}, opts);
    if (E > 0) w1e.narrow(0, 0, H).narrow(1, 0, E).copy_(W1.narrow(1, kSlots * S, E));
  }
};

// Per-thread scratch for one tile.
template <typename T>
struct TileScratch {
  std::vector<T> xin;  // [kTile][K]   inputs x = [n1..n6, s, u]
  std::vector<T> hid;  // [kTile][Hp]  hidden activations (backward: then their gradients in dhid)
  std::vector<T> chg;  // [kTile][Sp]  cell changes after tanh (backward: their gradients)
  std::vector<T> dhid;
  TileScratch(const Geometry& g, const PackedWeights<T>& w)
      : xin(kTile * g.K), hid(kTile * w.Hp), chg(kTile * w.Sp), dhid(kTile * w.Hp) {}
};

// Copies the inputs of the cells n0 .. n0 + count into xin, one row per cell.
template <typename T>
void gather_tile(const Geometry& g, const T* state, const T* external, int64_t n0, int64_t count, T* xin) {
  const int64_t S = g.S, E = g.E, K = g.K;
  for (int64_t l = 0; l < count; ++l) {
    const int64_t n = n0 + l;
    const int64_t b = n / g.cells;
    const int64_t* reads = g.neighbours.data() + (n - b * g.cells) * kSlots;
    const T* sample = state + b * g.cells * S;
    T* row = xin + l * K;
    // Plain loops, not std::copy: rows are a few values long, and a memmove call per row costs more.
    for (int slot = 0; slot < kSlots; ++slot) {
      const int64_t src = reads[slot];
      T* dst = row + slot * S;
      if (src < 0) {
        for (int64_t c = 0; c < S; ++c) dst[c] = T(0);
      } else {
        const T* from = sample + src * S;
        for (int64_t c = 0; c < S; ++c) dst[c] = from[c];
      }
    }
    const T* u = external + n * E;
    for (int64_t e = 0; e < E; ++e) row[kSlots * S + e] = u[e];
  }
}

// Forward of one tile up to the cell change: fills s.xin, s.hid (activated) and s.chg (after tanh).
template <typename T>
inline void forward_tile(const Geometry& g, const PackedWeights<T>& w, const T* state, const T* external,
                         int64_t n0, int64_t count, TileScratch<T>& s) {
  gather_tile(g, state, external, n0, count, s.xin.data());
  matmul_rows(s.xin.data(), g.K, count, g.K, w.w1t.template data_ptr<T>(), w.b1.template data_ptr<T>(),
              s.hid.data(), w.Hp);
  activate_inplace(s.hid.data(), count * w.Hp, g.activation);
  matmul_rows(s.hid.data(), w.Hp, count, w.Hp, w.w2t.template data_ptr<T>(), w.b2.template data_ptr<T>(),
              s.chg.data(), w.Sp);
  tanh_inplace(s.chg.data(), count * w.Sp);
}

template <typename T>
void forward_step_cpu(const Geometry& g, const PackedWeights<T>& w, const T* state, const T* external, T* out) {
  at::parallel_for(0, g.tiles(), 1, [&](int64_t begin, int64_t end) {
    TileScratch<T> s(g, w);
    const T step = static_cast<T>(g.step_size);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kTile;
      const int64_t count = std::min(kTile, g.N - n0);
      forward_tile(g, w, state, external, n0, count, s);
      for (int64_t l = 0; l < count; ++l) {
        const int64_t n = n0 + l;
        const T* c = s.chg.data() + l * w.Sp;
        T* o = out + n * g.S;
        if (g.update == kReplace) {
          for (int64_t i = 0; i < g.S; ++i) o[i] = c[i];
        } else {
          const T* prev = state + n * g.S;
          for (int64_t i = 0; i < g.S; ++i) o[i] = prev[i] + step * c[i];
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
  const Geometry g(s0, u, w1, boundary, activation, update, step_size);

  std::vector<int64_t> shape = {keep_trajectory ? steps + 1 : 1};
  for (int64_t d : s0.sizes()) shape.push_back(d);
  at::Tensor traj = at::empty(shape, s0.options());
  at::Tensor spare = keep_trajectory ? at::Tensor() : at::empty_like(s0);

  AT_DISPATCH_FLOATING_TYPES(s0.scalar_type(), "propagate_forward_cpu", [&] {
    const PackedWeights<scalar_t> w(g, w1, b1, w2, b2);
    const scalar_t* cur = s0.data_ptr<scalar_t>();
    scalar_t* spare_p = keep_trajectory ? nullptr : spare.data_ptr<scalar_t>();
    for (int64_t t = 0; t < steps; ++t) {
      scalar_t* next = step_destination(traj.data_ptr<scalar_t>(), spare_p, s0.numel(), t, steps, keep_trajectory);
      forward_step_cpu<scalar_t>(g, w, cur, u.data_ptr<scalar_t>(), next);
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
  check_backward_args(grad_trajectory, trajectory, external, w1, b1, w2, b2, steps, boundary, activation, update);
  TORCH_CHECK(trajectory.device().is_cpu(), "propagate_backward_cpu: tensors must be on the CPU");
  const at::Tensor traj = trajectory.contiguous(), gtraj = grad_trajectory.contiguous(), u = external.contiguous();
  const Geometry g(traj[0], u, w1, boundary, activation, update, step_size);
  const int64_t S = g.S, H = g.H, K = g.K, E = g.E, N = g.N;
  const std::vector<int64_t> readers = slot_readers(g);

  at::Tensor grad = gtraj[steps].clone();
  at::Tensor grad_next = at::empty_like(grad);
  at::Tensor grad_external = at::zeros_like(u);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_grads;

  AT_DISPATCH_FLOATING_TYPES(traj.scalar_type(), "propagate_backward_cpu", [&] {
    using T = scalar_t;
    const PackedWeights<T> w(g, w1, b1, w2, b2);
    const int64_t Hp = w.Hp, Sp = w.Sp, Ep = w.Ep;
    // d loss / d (pre-activation) of one step, per cell.
    at::Tensor dhidden = at::empty({N, Hp}, traj.options());
    // Weight gradients, one accumulator per thread, summed once at the end: [w1^T (K*Hp) | b1 | w2^T | b2].
    const int64_t threads = at::get_num_threads();
    const int64_t acc_size = K * Hp + Hp + Hp * Sp + Sp;
    at::Tensor acc = at::zeros({threads, acc_size}, traj.options());
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
        TileScratch<T> s(g, w);
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid < threads, "unexpected thread number ", tid);
        T* acc_w1t = acc.data_ptr<T>() + tid * acc_size;
        T* acc_b1 = acc_w1t + K * Hp;
        T* acc_w2t = acc_b1 + Hp;
        T* acc_b2 = acc_w2t + Hp * Sp;
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t n0 = tile * kTile;
          const int64_t count = std::min(kTile, N - n0);
          forward_tile(g, w, st, up, n0, count, s);
          T* dchg = s.chg.data();  // becomes d loss / d (pre-tanh change): (1 - c^2) * scale * grad
          for (int64_t l = 0; l < count; ++l) {
            T* d = dchg + l * Sp;
            const T* go = gp + (n0 + l) * S;
            for (int64_t i = 0; i < S; ++i) d[i] = (T(1) - d[i] * d[i]) * change_scale * go[i];
            for (int64_t i = S; i < Sp; ++i) d[i] = T(0);
            for (int64_t i = 0; i < Sp; ++i) acc_b2[i] += d[i];
          }
          accumulate_outer(s.hid.data(), Hp, count, Hp, dchg, acc_w2t, Sp);
          matmul_rows<T>(dchg, Sp, count, Sp, w.w2.template data_ptr<T>(), nullptr, s.dhid.data(), Hp);
          activation_backward_inplace(s.dhid.data(), s.hid.data(), count * Hp, g.activation);
          for (int64_t l = 0; l < count; ++l) {
            const T* d = s.dhid.data() + l * Hp;
            for (int64_t j = 0; j < Hp; ++j) acc_b1[j] += d[j];
          }
          accumulate_outer(s.xin.data(), K, count, K, s.dhid.data(), acc_w1t, Hp);
          std::copy(s.dhid.data(), s.dhid.data() + count * Hp, dh + n0 * Hp);
        }
      });
      // Pass 2: per cell, pull the hidden gradients of the cells that read it (and of itself) back through
      // W1, add the residual path and any gradient on the trajectory at t.
      const T* carry = gtraj[t].data_ptr<T>();
      T* out = grad_next.data_ptr<T>();
      at::parallel_for(0, g.tiles(), 1, [&](int64_t begin, int64_t end) {
        std::vector<T> gathered(kTile * kSlots * Hp), sgrad(kTile * Sp), egrad(kTile * Ep);
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t n0 = tile * kTile;
          const int64_t count = std::min(kTile, N - n0);
          for (int64_t l = 0; l < count; ++l) {
            const int64_t n = n0 + l;
            const int64_t b = n / g.cells;
            const int64_t cell = n - b * g.cells;
            const T* own = dh + n * Hp;
            T* row = gathered.data() + l * kSlots * Hp;
            for (int slot = 0; slot < 6; ++slot) {
              const int64_t other = readers[(cell * 6 + slot) * 2];
              const bool self = readers[(cell * 6 + slot) * 2 + 1] != 0;
              T* dst = row + slot * Hp;
              if (other >= 0) {
                const T* src = dh + (b * g.cells + other) * Hp;
                for (int64_t j = 0; j < Hp; ++j) dst[j] = src[j];
              } else {
                for (int64_t j = 0; j < Hp; ++j) dst[j] = T(0);
              }
              if (self)
                for (int64_t j = 0; j < Hp; ++j) dst[j] += own[j];
            }
            for (int64_t j = 0; j < Hp; ++j) row[6 * Hp + j] = own[j];
          }
          matmul_rows<T>(gathered.data(), kSlots * Hp, count, kSlots * Hp, w.pull.template data_ptr<T>(), nullptr,
                         sgrad.data(), Sp);
          if (E > 0)
            matmul_rows<T>(gathered.data() + 6 * Hp, kSlots * Hp, count, Hp, w.w1e.template data_ptr<T>(), nullptr,
                           egrad.data(), Ep);
          for (int64_t l = 0; l < count; ++l) {
            const int64_t n = n0 + l;
            const T* sg = sgrad.data() + l * Sp;
            for (int64_t c = 0; c < S; ++c) {
              const T residual = update == kResidual ? gp[n * S + c] : T(0);
              out[n * S + c] = sg[c] + residual + carry[n * S + c];
            }
            for (int64_t e = 0; e < E; ++e) gext[n * E + e] += egrad[l * Ep + e];
          }
        }
      });
      std::swap(grad, grad_next);
    }
    // Sum the per-thread accumulators and undo the padding and transposes.
    const at::Tensor sums = acc.sum(0);
    int64_t off = 0;
    const at::Tensor gw1t = sums.narrow(0, off, K * Hp).view({K, Hp});
    off += K * Hp;
    const at::Tensor gb1 = sums.narrow(0, off, Hp);
    off += Hp;
    const at::Tensor gw2t = sums.narrow(0, off, Hp * Sp).view({Hp, Sp});
    off += Hp * Sp;
    const at::Tensor gb2 = sums.narrow(0, off, Sp);
    // clone(): each gradient must own its storage (narrow views of one buffer would alias).
    weight_grads = {gw1t.narrow(1, 0, H).t().clone(at::MemoryFormat::Contiguous), gb1.narrow(0, 0, H).clone(),
                    gw2t.narrow(0, 0, H).narrow(1, 0, S).t().clone(at::MemoryFormat::Contiguous),
                    gb2.narrow(0, 0, S).clone()};
  });
  return {grad, grad_external, std::get<0>(weight_grads), std::get<1>(weight_grads), std::get<2>(weight_grads),
          std::get<3>(weight_grads)};
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
