// The CPU kernels of the lattice propagation op, for one pair of SIMD vector widths: csrc/cubecore.cpp includes
// this file once per pair (CUBECORE_HIDDEN_BYTES, CUBECORE_STATE_BYTES: 32/32, and where the machine has
// AVX-512 also 64/32 and 64/64), each time inside a namespace of its own, and chooses per call.  No include
// guard: it is meant to be included more than once.

namespace {

// ---- small dense building blocks ----------------------------------------------------------------------------
//
// Feature dimensions (hidden H, state S, a cell's packed input-state gradients 7S) are padded to whole SIMD
// vectors, so every matrix product is a loop of vector FMAs over its output features, with the accumulators of
// a few cells held in registers and handed to an epilogue (activation, store) before they leave them.  Inputs
// are read where they lie: a cell's input row is a list of segments (its six neighbours' states, its own, its
// external input), each a pointer to a few contiguous values, so no gathered copy of the inputs is ever made.

constexpr int64_t kTile = 32;
// Vector accumulators a block keeps in registers: half the register file (32 with AVX-512VL, else 16).
#ifdef __AVX512VL__
constexpr int kAccumulators = 16;
#else
constexpr int kAccumulators = 8;
#endif
// Output vectors one product computes at a time; wider outputs are done in chunks of this many.  Four keeps
// the loads per FMA low: a block of 4 cells x 4 vectors loads 4 weight vectors and 4 inputs for 16 FMAs.
constexpr int kMaxVectors = 4;
// Segments of a cell's input row: the states of its seven slots, then its external input.
constexpr int kSegments = kSlots + 1;

// Bytes of the SIMD vectors, set by the file that includes this one (32 or 64): those over the hidden features
// (and over a cell's packed input-state gradients) and those over the state features.  They differ where a
// state is shorter than a 64-byte vector but the hidden layer is not (S = 8, H = 16 with AVX-512): the products
// that dominate (into and out of the hidden layer) then run on 64-byte vectors, and a state stays whole
// 32-byte vectors.
constexpr int kHiddenBytes = CUBECORE_HIDDEN_BYTES;
constexpr int kStateBytes = CUBECORE_STATE_BYTES;

template <typename T, int Bytes>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int width = Bytes / sizeof(T);
};
template <typename T>
using HiddenVec = Vec<T, kHiddenBytes>;
template <typename T>
using StateVec = Vec<T, kStateBytes>;

// The element type and lane count of a vector type.
template <class V>
using lane_t = std::remove_cvref_t<decltype(std::declval<V>()[0])>;
template <class V>
constexpr int lanes_of = sizeof(V) / sizeof(lane_t<V>);

// The sum of a vector's lanes, by halves (a lane-by-lane loop is a chain of scalar adds).
template <class V>
inline lane_t<V> horizontal_sum(V v) {
  if constexpr (lanes_of<V> == 1) {
    return v[0];
  } else {
    typedef lane_t<V> Half __attribute__((vector_size(sizeof(V) / 2)));
    Half low, high;
    __builtin_memcpy(&low, &v, sizeof(Half));
    __builtin_memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return horizontal_sum(low + high);
  }
}

template <class V, typename T>
inline V vload(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, class V>
inline void vstore(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// n rounded up to whole vectors of Bytes.
template <typename T, int Bytes>
inline int64_t padded(int64_t n) {
  constexpr int W = Vec<T, Bytes>::width;
  return (n + W - 1) / W * W;
}

// dst[0:n] += src[0:n], by whole vectors when n is a multiple of the vector width.
template <typename T>
inline void add_into(T* dst, const T* src, int64_t n) {
  using V = typename StateVec<T>::type;
  constexpr int W = StateVec<T>::width;
  if (n % W == 0) {
    for (int64_t i = 0; i < n; i += W) vstore(dst + i, vload<V>(dst + i) + vload<V>(src + i));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
  }
}

// The input rows of a product.  DenseRows: row i of a matrix, one segment.  CellRows: the input rows of a
// tile of cells read in place, segment s of cell i starting at ptr[i * segments + s].
template <typename T>
struct DenseRows {
  static constexpr int kMaxBlock = kAccumulators;
  static constexpr int kStateLength = 0;  // no segment length known when compiling
  const T* in;
  int64_t ld, length;
  int segments() const { return 1; }
  int64_t length_of(int) const { return length; }
  const T* row(int64_t i, int) const { return in + i * ld; }
};
// L > 0: the seven state segments are L values long, known when compiling, so their loops unroll.
template <typename T, int L = 0>
struct CellRows {
  static constexpr int kMaxBlock = 8;  // one pointer per cell of a block must fit the general registers
  static constexpr int kStateLength = L;
  const T* const* ptr;
  int nseg;
  const int64_t* lengths;
  int segments() const { return nseg; }
  int64_t length_of(int s) const { return lengths[s]; }
  const T* row(int64_t i, int s) const { return ptr[i * nseg + s]; }
};

// Runs f(std::integral_constant<int, L>) with L = S where the kernels are compiled for that state size
// (8 and 16, the sizes cubecore's models use), else with L = 0 (any size, loops of runtime length).
template <class F>
decltype(auto) with_state_length(int64_t S, F&& f) {
  if (S == 8) return f(std::integral_constant<int, 8>{});
  if (S == 16) return f(std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, 0>{});
}

// For cells c0 .. c0 + NB: acc = bias + x_c @ WT (RV vectors of output columns; WT rows ldw apart), then
// epilogue(c, acc, RV) while acc is still in registers.
template <int Bytes, typename T, int RV, int NB, class Rows, class Epilogue>
inline void matmul_block(const Rows& rows, int64_t c0, const T* WT, int64_t ldw, const T* bias, Epilogue& epilogue) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int W = Vec<T, Bytes>::width;
  V acc[NB][RV];
#pragma GCC unroll 16
  for (int r = 0; r < RV; ++r) {
    const V b = bias ? vload<V>(bias + r * W) : V{};
#pragma GCC unroll 16
    for (int i = 0; i < NB; ++i) acc[i][r] = b;
  }
  const T* w = WT;
  for (int s = 0; s < rows.segments(); ++s) {
    const T* x[NB];
#pragma GCC unroll 16
    for (int i = 0; i < NB; ++i) x[i] = rows.row(c0 + i, s);
    auto step = [&](int64_t k) {
      V wv[RV];
#pragma GCC unroll 16
      for (int r = 0; r < RV; ++r) wv[r] = vload<V>(w + k * ldw + r * W);
#pragma GCC unroll 16
      for (int i = 0; i < NB; ++i) {
        const T xi = x[i][k];
#pragma GCC unroll 16
        for (int r = 0; r < RV; ++r) acc[i][r] += wv[r] * xi;
      }
    };
    constexpr int L = Rows::kStateLength;
    if (L > 0 && s < kSlots) {
#pragma GCC unroll 8
      for (int k = 0; k < L; ++k) step(k);
      w += L * ldw;
    } else {
      const int64_t length = rows.length_of(s);
      for (int64_t k = 0; k < length; ++k) step(k);
      w += length * ldw;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NB; ++i) epilogue(c0 + i, acc[i], std::integral_constant<int, RV>{});
}

template <int Bytes, typename T, int RV, class Rows, class Epilogue>
void matmul_cells(const Rows& rows, int64_t C, const T* WT, int64_t ldw, const T* bias, Epilogue& epilogue) {
  constexpr int NB = std::min(Rows::kMaxBlock, RV >= kAccumulators ? 1 : kAccumulators / RV);
  int64_t c = 0;
  for (; c + NB <= C; c += NB) matmul_block<Bytes, T, RV, NB>(rows, c, WT, ldw, bias, epilogue);
  for (; c < C; ++c) matmul_block<Bytes, T, RV, 1>(rows, c, WT, ldw, bias, epilogue);
}

// out_c = bias + x_c @ WT for the C cells of `rows`, WT [K][R] with R a multiple of the width of vectors of
// Bytes; each chunk of output vectors goes to epilogue(c, col, acc, RV) with col its first column.
template <int Bytes, typename T, class Rows, class Epilogue>
void matmul(const Rows& rows, int64_t C, const T* WT, int64_t R, std::type_identity_t<const T*> bias,
            Epilogue&& epilogue) {
  constexpr int W = Vec<T, Bytes>::width;
  for (int64_t col = 0; col < R; col += kMaxVectors * W) {
    auto at_col = [&](int64_t c, auto* acc, auto rv) { epilogue(c, col, acc, rv); };
    const T* wt = WT + col;
    const T* b = bias ? bias + col : nullptr;
    switch (std::min<int64_t>(R - col, kMaxVectors * W) / W) {
      case 1: matmul_cells<Bytes, T, 1>(rows, C, wt, R, b, at_col); break;
      case 2: matmul_cells<Bytes, T, 2>(rows, C, wt, R, b, at_col); break;
      case 3: matmul_cells<Bytes, T, 3>(rows, C, wt, R, b, at_col); break;
      default: matmul_cells<Bytes, T, 4>(rows, C, wt, R, b, at_col); break;
    }
  }
}

// Epilogue that stores the accumulators as rows of out (row stride ld).
template <typename T>
auto store_rows(T* out, int64_t ld) {
  return [=](int64_t c, int64_t col, auto* acc, auto rv) {
    constexpr int W = lanes_of<std::remove_cvref_t<decltype(*acc)>>;
    for (int r = 0; r < decltype(rv)::value; ++r) vstore(out + c * ld + col + r * W, acc[r]);
  };
}

// G[k][0:RV*W] += sum_c x_c[k] * D[c][0:RV*W] over the input rows k (segments one after another): a weight
// gradient, rows of G held in registers in blocks of KB, then halves of it for what is left of a segment.
template <int Bytes, typename T, int RV, int KB, class Rows>
inline void accumulate_outer_rows(const Rows& rows, int s, int64_t& k0, int64_t length, int64_t C, const T* D,
                                  int64_t ldd, T* G, int64_t ldg) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int W = Vec<T, Bytes>::width;
  for (; k0 + KB <= length; k0 += KB) {
    V acc[KB][RV];
#pragma GCC unroll 16
    for (int i = 0; i < KB; ++i)
#pragma GCC unroll 16
      for (int r = 0; r < RV; ++r) acc[i][r] = vload<V>(G + (k0 + i) * ldg + r * W);
    for (int64_t c = 0; c < C; ++c) {
      V d[RV];
#pragma GCC unroll 16
      for (int r = 0; r < RV; ++r) d[r] = vload<V>(D + c * ldd + r * W);
      const T* x = rows.row(c, s) + k0;
#pragma GCC unroll 16
      for (int i = 0; i < KB; ++i) {
        const T xi = x[i];
#pragma GCC unroll 16
        for (int r = 0; r < RV; ++r) acc[i][r] += d[r] * xi;
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < KB; ++i)
#pragma GCC unroll 16
      for (int r = 0; r < RV; ++r) vstore(G + (k0 + i) * ldg + r * W, acc[i][r]);
  }
  if constexpr (KB > 1) accumulate_outer_rows<Bytes, T, RV, KB / 2>(rows, s, k0, length, C, D, ldd, G, ldg);
}

template <int Bytes, typename T, int RV, class Rows>
void accumulate_outer_cols(const Rows& rows, int64_t C, const T* D, int64_t ldd, T* G, int64_t ldg) {
  constexpr int KB = RV >= kAccumulators ? 1 : kAccumulators / RV;
  constexpr int L = Rows::kStateLength;
  for (int s = 0; s < rows.segments(); ++s) {
    const int64_t length = L > 0 && s < kSlots ? L : rows.length_of(s);
    int64_t k0 = 0;
    accumulate_outer_rows<Bytes, T, RV, KB>(rows, s, k0, length, C, D, ldd, G, ldg);
    G += length * ldg;
  }
}

// G [K][R] += X^T @ D for the C input rows of `rows` and D [C][R]; R a multiple of the width of vectors of
// Bytes.
template <int Bytes, typename T, class Rows>
void accumulate_outer(const Rows& rows, int64_t C, const T* D, T* G, int64_t R) {
  constexpr int W = Vec<T, Bytes>::width;
  for (int64_t col = 0; col < R; col += kMaxVectors * W) {
    switch (std::min<int64_t>(R - col, kMaxVectors * W) / W) {
      case 1: accumulate_outer_cols<Bytes, T, 1>(rows, C, D + col, R, G + col, R); break;
      case 2: accumulate_outer_cols<Bytes, T, 2>(rows, C, D + col, R, G + col, R); break;
      case 3: accumulate_outer_cols<Bytes, T, 3>(rows, C, D + col, R, G + col, R); break;
      default: accumulate_outer_cols<Bytes, T, 4>(rows, C, D + col, R, G + col, R); break;
    }
  }
}

// ---- activations ------------------------------------------------------------------------------------------

// 1 / q for q in [4.8e-3, 1.3], q a vector of floats: a hardware estimate refined by one Newton step (a
// division costs several times as much), within an ulp or two.
template <class V>
inline V reciprocal(V q) {
  V e;
  if constexpr (sizeof(V) == 64) {
#ifdef __AVX512F__
    __m512 qm;
    __builtin_memcpy(&qm, &q, sizeof(qm));
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's own _mm512_rcp14_ps starts from an undefined vector
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
    const __m512 em = _mm512_rcp14_ps(qm);
#pragma GCC diagnostic pop
    __builtin_memcpy(&e, &em, sizeof(e));
#else
    return 1 / q;
#endif
  } else {
#ifdef __AVX__  // (AVX-512VL implies it)
    __m256 qm;
    __builtin_memcpy(&qm, &q, sizeof(qm));
#ifdef __AVX512VL__
    const __m256 em = _mm256_rcp14_ps(qm);
#else
    const __m256 em = _mm256_rcp_ps(qm);
#endif
    __builtin_memcpy(&e, &em, sizeof(e));
#else
    return 1 / q;
#endif
  }
  return e * (2 - q * e);
}

// tanh of a vector: of floats, a clamped rational approximation (Eigen's generic_fast_tanh_float), within a
// few ulp of std::tanh; of doubles, std::tanh lane by lane.
template <class V>
inline V tanh_vec(V a) {
  if constexpr (std::is_same_v<lane_t<V>, double>) {
    for (int i = 0; i < lanes_of<V>; ++i) a[i] = std::tanh(a[i]);
    return a;
  } else {
    const V hi = V{} + 7.90531110763549805f, lo = -hi;
    const V x = a > hi ? hi : (a < lo ? lo : a);
    const V x2 = x * x;
    V p = V{} - 2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    p = p * x;
    V q = V{} + 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return p * reciprocal(q);
  }
}

template <typename V>
inline V activate_vec(V v, int64_t activation) {
  if (activation == kTanh) return tanh_vec(v);
  if (activation == kRelu) return v > 0 ? v : V{};
  return 0.5 + 0.5 * tanh_vec(0.5 * v);  // sigmoid(x) = (1 + tanh(x / 2)) / 2
}

// act'(pre-activation), written in terms of the activation's output a.
template <typename V>
inline V activation_slope_vec(V a, int64_t activation) {
  if (activation == kTanh) return 1 - a * a;
  if (activation == kRelu) return a > 0 ? V{} + 1 : V{};
  return a * (1 - a);
}

// ---- the lattice ------------------------------------------------------------------------------------------

struct Geometry {
  int64_t B, X, Y, Z, S, E, H, K;
  int64_t cells;  // X * Y * Z
  int64_t N;      // B * cells
  int64_t boundary, activation, update;
  double step_size;
  int segments;                      // input segments of a cell: kSlots, plus one when E > 0
  int64_t lengths[kSegments];        // their lengths: S for each slot, then E
  std::vector<int64_t> neighbours;  // [cells][kSlots]: the cell each slot reads (-1: zeros), the same per sample

  Geometry(const at::Tensor& state, const at::Tensor& external, const at::Tensor& w1, int64_t boundary_,
           int64_t activation_, int64_t update_, double step_size_)
      : B(state.size(0)), X(state.size(1)), Y(state.size(2)), Z(state.size(3)), S(state.size(4)),
        E(external.size(4)), H(w1.size(0)), K(w1.size(1)), boundary(boundary_), activation(activation_),
        update(update_), step_size(step_size_) {
    cells = X * Y * Z;
    N = B * cells;
    segments = E > 0 ? kSegments : kSlots;
    for (int s = 0; s < kSlots; ++s) lengths[s] = S;
    lengths[kSlots] = E;
    neighbours.resize(cells * kSlots);
    for (int64_t x = 0; x < X; ++x)
      for (int64_t y = 0; y < Y; ++y)
        for (int64_t z = 0; z < Z; ++z)
          for (int slot = 0; slot < kSlots; ++slot)
            neighbours[((x * Y + y) * Z + z) * kSlots + slot] = neighbour_index(x, y, z, slot, X, Y, Z, boundary);
  }
  int64_t tiles() const { return (N + kTile - 1) / kTile; }
};

// The weights rearranged for the kernels: transposed where the kernels read them by input row, with feature
// dimensions padded to whole vectors (the padding is zeros, so padded lanes stay out of every result).
template <typename T>
struct PackedWeights {
  int64_t Hp, Sp, Ks;
  at::Tensor w1t;  // [K][Hp]:  W1^T (forward: input -> hidden)
  at::Tensor b1;   // [Hp]
  at::Tensor w2t;  // [Hp][Sp]: W2^T (forward: hidden -> change)
  at::Tensor b2;   // [Sp]
  at::Tensor w2;   // [Sp][Hp]: W2   (backward: change gradient -> hidden gradient)
  at::Tensor w1;   // [Hp][Ks]: W1's state columns (backward: hidden gradient -> state-slot gradients)
  at::Tensor w1e;  // [E][Hp]:  W1's external columns, transposed (backward: hidden gradient -> external)

  PackedWeights(const Geometry& g, const at::Tensor& W1, const at::Tensor& B1, const at::Tensor& W2,
                const at::Tensor& B2)
      : Hp(padded<T, kHiddenBytes>(g.H)),
        Sp(padded<T, kStateBytes>(g.S)),
        Ks(padded<T, kHiddenBytes>(kSlots * g.S)) {
    const int64_t H = g.H, S = g.S, K = g.K;
    auto opts = W1.options();
    w1t = at::zeros({K, Hp}, opts);
    w1t.narrow(1, 0, H).copy_(W1.t());
    b1 = at::zeros({Hp}, opts);
    b1.narrow(0, 0, H).copy_(B1);
    w2t = at::zeros({Hp, Sp}, opts);
    w2t.narrow(0, 0, H).narrow(1, 0, S).copy_(W2.t());
    b2 = at::zeros({Sp}, opts);
    b2.narrow(0, 0, S).copy_(B2);
    w2 = at::zeros({Sp, Hp}, opts);
    w2.narrow(0, 0, S).narrow(1, 0, H).copy_(W2);
    w1 = at::zeros({Hp, Ks}, opts);
    w1.narrow(0, 0, H).narrow(1, 0, kSlots * S).copy_(W1.narrow(1, 0, kSlots * S));
    w1e = at::zeros({g.E, Hp}, opts);
    w1e.narrow(1, 0, H).copy_(W1.narrow(1, kSlots * S, g.E).t());
  }
};

// Per-thread scratch for one tile.
template <typename T>
struct TileScratch {
  std::vector<const T*> inputs;  // [kTile][segments]: where each input segment of a cell lies
  std::vector<T> zeros;          // [S]: what a slot reads through a wall
  std::vector<T> hid;            // [kTile][Hp]: hidden activations
  std::vector<T> chg;            // [kTile][Sp]: cell changes after tanh (backward: then their gradients)
  std::vector<T> dhid;           // [kTile][Hp]: backward: gradients of the hidden pre-activations
  std::vector<T> dinput;         // [kTile][Ks]: backward: gradients of the state slots of the input rows
  TileScratch(const Geometry& g, const PackedWeights<T>& w)
      : inputs(kTile * kSegments), zeros(g.S), hid(kTile * w.Hp), chg(kTile * w.Sp) {}
  void for_backward(const PackedWeights<T>& w) {
    dhid.resize(kTile * w.Hp);
    dinput.resize(kTile * w.Ks);
  }
};

// Points the input segments of cells n0 .. n0 + count at their slots' states and their external input.
template <typename T, int L>
CellRows<T, L> cell_rows(const Geometry& g, const T* state, const T* external, int64_t n0, int64_t count,
                         TileScratch<T>& s) {
  const int nseg = g.segments;
  const int64_t S = L > 0 ? L : g.S;
  int64_t b = n0 / g.cells, cell = n0 - b * g.cells;
  const T* sample = state + b * g.cells * S;
  const T** row = s.inputs.data();
  for (int64_t l = 0; l < count; ++l, row += nseg) {
    const int64_t* reads = g.neighbours.data() + cell * kSlots;
    for (int slot = 0; slot < kSlots; ++slot) row[slot] = reads[slot] < 0 ? s.zeros.data() : sample + reads[slot] * S;
    if (nseg > kSlots) row[kSlots] = external + (n0 + l) * g.E;
    if (++cell == g.cells) {
      cell = 0;
      sample += g.cells * S;
    }
  }
  return CellRows<T, L>{s.inputs.data(), nseg, g.lengths};
}

// Forward of one tile: s.hid gets the hidden activations, and on_change(c, col, acc, RV) the cell changes
// after tanh, still in registers (on_change = nullptr: stop after the hidden activations).  Returns the
// tile's input rows.
template <int L, typename T, class OnChange>
inline CellRows<T, L> forward_tile(const Geometry& g, const PackedWeights<T>& w, const T* state, const T* external,
                                   int64_t n0, int64_t count, TileScratch<T>& s, OnChange&& on_change) {
  using HV = typename HiddenVec<T>::type;
  using SV = typename StateVec<T>::type;
  constexpr int W = HiddenVec<T>::width;
  const CellRows<T, L> rows = cell_rows<T, L>(g, state, external, n0, count, s);
  T* hid = s.hid.data();
  const int64_t Hp = w.Hp, activation = g.activation;
  matmul<kHiddenBytes>(rows, count, w.w1t.template data_ptr<T>(), Hp, w.b1.template data_ptr<T>(),
                       [&](int64_t c, int64_t col, HV* acc, auto rv) {
                         for (int r = 0; r < decltype(rv)::value; ++r)
                           vstore(hid + c * Hp + col + r * W, activate_vec(acc[r], activation));
                       });
  if constexpr (!std::is_same_v<std::decay_t<OnChange>, std::nullptr_t>) {
    matmul<kStateBytes>(DenseRows<T>{hid, Hp, Hp}, count, w.w2t.template data_ptr<T>(), w.Sp,
                        w.b2.template data_ptr<T>(), [&](int64_t c, int64_t col, SV* acc, auto rv) {
                          for (int r = 0; r < decltype(rv)::value; ++r) acc[r] = tanh_vec(acc[r]);
                          on_change(c, col, acc, rv);
                        });
  }
  return rows;
}

// How the work is split over threads.  Samples are independent: where there are enough of them, each thread
// takes whole samples through every step, so that a sample's states stay in its core's caches and no step
// waits for another thread.  Otherwise each step is split across threads, with a barrier between steps (the
// forward over tiles of cells; the backward over slabs of x-planes, see scatter_slabs).
inline bool split_by_sample(const Geometry& g) {
  const int64_t threads = at::get_num_threads();
  return g.B % threads == 0 || g.B >= 4 * threads;
}

// One forward step of the cells n_begin .. n_end: state -> out.
template <int L, typename T>
void forward_cells(const Geometry& g, const PackedWeights<T>& w, const T* state, const T* external, T* out,
                   int64_t n_begin, int64_t n_end, TileScratch<T>& s) {
  using V = typename StateVec<T>::type;
  constexpr int W = StateVec<T>::width;
  const int64_t S = L > 0 ? L : g.S, Sp = w.Sp;
  const bool whole_vectors = S == Sp;  // the changes can be written straight from the registers
  const bool residual = g.update == kResidual;
  const T step = static_cast<T>(g.step_size);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int64_t count = std::min(kTile, n_end - n0);
    forward_tile<L>(g, w, state, external, n0, count, s, [&](int64_t c, int64_t col, V* acc, auto rv) {
      for (int r = 0; r < decltype(rv)::value; ++r) {
        const int64_t at = (n0 + c) * S + col + r * W;
        if (whole_vectors) {
          vstore(out + at, residual ? vload<V>(state + at) + step * acc[r] : acc[r]);
        } else {
          vstore(s.chg.data() + c * Sp + col + r * W, acc[r]);
        }
      }
    });
    if (whole_vectors) continue;
    for (int64_t l = 0; l < count; ++l) {
      const int64_t n = n0 + l;
      const T* c = s.chg.data() + l * Sp;
      for (int64_t i = 0; i < S; ++i) out[n * S + i] = residual ? state[n * S + i] + step * c[i] : c[i];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> propagate_forward_cpu(
    const at::Tensor& state, const at::Tensor& external, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, int64_t steps, int64_t boundary, int64_t activation,
    int64_t update, double step_size, bool keep_trajectory) {
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
    using T = scalar_t;
    const PackedWeights<T> w(g, w1, b1, w2, b2);
    const T* first = s0.data_ptr<T>();
    const T* up = u.data_ptr<T>();
    T* traj_p = traj.data_ptr<T>();
    T* spare_p = keep_trajectory ? nullptr : spare.data_ptr<T>();
    auto destination = [&](int64_t t) { return step_destination(traj_p, spare_p, s0.numel(), t, steps, keep_trajectory); };
    with_state_length(g.S, [&](auto state_length) {
      constexpr int L = decltype(state_length)::value;
      if (split_by_sample(g)) {
        at::parallel_for(0, g.B, 1, [&](int64_t b_begin, int64_t b_end) {
          TileScratch<T> s(g, w);
          for (int64_t b = b_begin; b < b_end; ++b) {
            const T* cur = first;
            for (int64_t t = 0; t < steps; ++t) {
              forward_cells<L>(g, w, cur, up, destination(t), b * g.cells, (b + 1) * g.cells, s);
              cur = destination(t);
            }
          }
        });
      } else {
        const T* cur = first;
        for (int64_t t = 0; t < steps; ++t) {
          at::parallel_for(0, g.tiles(), 1, [&](int64_t begin, int64_t end) {
            TileScratch<T> s(g, w);
            forward_cells<L>(g, w, cur, up, destination(t), begin * kTile, std::min(end * kTile, g.N), s);
          });
          cur = destination(t);
        }
      }
    });
    if (keep_trajectory) traj[0].copy_(s0);
  });
  return forward_outputs(traj, keep_trajectory);
}

// For the backward's gather: for every cell and neighbour slot k < kNeighbours, the offset (within its
// sample's rows of neighbour-slot gradients, kNeighbours * S values per cell) of the gradient that the cell
// that reads this one through k sends back, or -1 if none does; and whether the cell reads itself through k
// (a reflecting edge).
struct SlotReaders {
  std::vector<int64_t> offset;  // [cells][kNeighbours]
  std::vector<char> self;       // [cells][kNeighbours]
  bool any_self = false;
  SlotReaders() = default;
  explicit SlotReaders(const Geometry& g) : offset(g.cells * kNeighbours), self(g.cells * kNeighbours) {
    const int64_t extent[3] = {g.X, g.Y, g.Z};
    for (int64_t x = 0; x < g.X; ++x)
      for (int64_t y = 0; y < g.Y; ++y)
        for (int64_t z = 0; z < g.Z; ++z) {
          const int64_t cell = (x * g.Y + y) * g.Z + z;
          for (int slot = 0; slot < kNeighbours; ++slot) {
            const int axis = slot / 2;
            int64_t c3[3] = {x, y, z};
            int64_t other;
            bool reads_itself;
            readers_through_slot(c3[axis], (slot & 1) ? 1 : -1, extent[axis], g.boundary, &other, &reads_itself);
            c3[axis] = other;
            offset[cell * kNeighbours + slot] =
                other < 0 ? -1 : ((c3[0] * g.Y + c3[1]) * g.Z + c3[2]) * kNeighbours * g.S + slot * g.S;
            self[cell * kNeighbours + slot] = reads_itself;
            any_self = any_self || reads_itself;
          }
        }
  }
};

// The weight gradients of one thread: [w1^T (K x Hp) | b1 (Hp) | w2 (Sp x Hp) | b2 (Sp)], summed over
// threads once at the end.  Both matrices are laid out with the hidden features last, so that both sums run
// on hidden-width vectors.
template <typename T>
struct WeightGrads {
  T *w1t, *b1, *w2, *b2;
};

// What the passes of one backward call share: the problem, the packed weights, the saved states, and where
// the gradients go.
template <typename T>
struct Backward {
  const Geometry& g;
  const PackedWeights<T>& w;
  const T* traj;            // [T + 1][N][S]: the saved states
  int64_t state_numel;      // N * S
  const T* external;        // [N][E]
  T* grad_external;         // [N][E]
  // How the gradient of a state reaches it from the cells that read it (its neighbours, and itself through a
  // reflecting edge).  scatter: each reader adds it straight into that state's gradient (where a thread owns
  // whole samples, or a slab of planes that no slab run beside it reads: race-free either way).  Otherwise (a
  // step split over tiles) the tile pass writes each cell's
  // neighbour-slot gradients to `sent` ([N][kNeighbours * S]) and gather_sent collects them.
  bool scatter;
  T* sent;
  const SlotReaders& readers;
  T change_scale;           // d next state / d change: 1 (replace) or step_size (residual)
  T* acc;                   // [threads][acc_size]: each thread's WeightGrads, on cache lines of its own
  int64_t acc_size, threads;

  WeightGrads<T> thread_grads() const {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "unexpected thread number ", tid);
    T* base = acc + tid * acc_size;
    const int64_t K = g.K, Hp = w.Hp, Sp = w.Sp;
    return {base, base + K * Hp, base + K * Hp + Hp, base + K * Hp + Hp + Sp * Hp};
  }
};

// Backward step 1 of a tile: the gradient at the change's pre-activation, (1 - c^2) * scale * upstream, into
// s.chg (padded rows), and its sum into b2's gradient.  `change` holds the tile's changes after tanh.
template <int L, typename T>
inline void change_gradient(const Backward<T>& bw, const T* change, int64_t change_ld, const T* gp, int64_t n0,
                            int64_t count, TileScratch<T>& s, T* grad_b2) {
  using V = typename StateVec<T>::type;
  constexpr int W = StateVec<T>::width;
  const int64_t S = L > 0 ? L : bw.g.S, Sp = bw.w.Sp;
  T* dchg = s.chg.data();
  if constexpr (L > 0 && L % W == 0) {
    V b2_sum[L / W] = {};
    for (int64_t l = 0; l < count; ++l)
      for (int r = 0; r < L / W; ++r) {
        const V c = vload<V>(change + l * change_ld + r * W);
        const V d = (1 - c * c) * bw.change_scale * vload<V>(gp + (n0 + l) * S + r * W);
        vstore(dchg + l * Sp + r * W, d);
        b2_sum[r] += d;
      }
    for (int r = 0; r < L / W; ++r) vstore(grad_b2 + r * W, vload<V>(grad_b2 + r * W) + b2_sum[r]);
  } else {
    for (int64_t l = 0; l < count; ++l) {
      T* d = dchg + l * Sp;
      const T* c = change + l * change_ld;
      const T* go = gp + (n0 + l) * S;
      for (int64_t i = 0; i < S; ++i) d[i] = (T(1) - c[i] * c[i]) * bw.change_scale * go[i];
      for (int64_t i = S; i < Sp; ++i) d[i] = T(0);
      add_into(grad_b2, d, Sp);
    }
  }
}

// Backward step 2 of a tile: the gradient at the hidden pre-activations, (W2^T dchg) * act', into s.dhid, its
// sum into b1's gradient, and the external input's gradient (a dot product with W1's external columns).
template <typename T>
inline void hidden_gradient(const Backward<T>& bw, int64_t n0, int64_t count, TileScratch<T>& s, T* grad_b1) {
  using V = typename HiddenVec<T>::type;
  constexpr int W = HiddenVec<T>::width;
  const int64_t Hp = bw.w.Hp, Sp = bw.w.Sp, E = bw.g.E;
  const T* hid = s.hid.data();
  T* dhid = s.dhid.data();
  const T* w1e = bw.w.w1e.template data_ptr<T>();
  matmul<kHiddenBytes>(DenseRows<T>{s.chg.data(), Sp, Sp}, count, bw.w.w2.template data_ptr<T>(), Hp, nullptr,
         [&](int64_t c, int64_t col, V* a, auto rv) {
           constexpr int RV = decltype(rv)::value;
           for (int r = 0; r < RV; ++r) {
             const int64_t at = c * Hp + col + r * W;
             const V d = a[r] * activation_slope_vec(vload<V>(hid + at), bw.g.activation);
             a[r] = d;
             vstore(dhid + at, d);
             vstore(grad_b1 + col + r * W, vload<V>(grad_b1 + col + r * W) + d);
           }
           for (int64_t e = 0; e < E; ++e) {
             V dot = a[0] * vload<V>(w1e + e * Hp + col);
             for (int r = 1; r < RV; ++r) dot += a[r] * vload<V>(w1e + e * Hp + col + r * W);
             bw.grad_external[(n0 + c) * E + e] += horizontal_sum(dot);
           }
         });
}

// Backward step 3 of a tile: W1^T's state columns times s.dhid, the gradients of the seven states each cell
// read.  The own-state part (with the residual path's upstream gradient) goes to `out`; the neighbour parts
// are added into `out` at the states read (scatter) or written to bw.sent.  The product runs on hidden-width
// vectors; its epilogue takes each in pieces of state width, so that a piece never straddles two slots where a
// state is whole state-width vectors.
template <int L, typename T>
inline void input_gradient(const Backward<T>& bw, const CellRows<T, L>& rows, const T* st, const T* gp, T* out,
                           int64_t n0, int64_t count, TileScratch<T>& s) {
  using HV = typename HiddenVec<T>::type;
  using V = typename StateVec<T>::type;
  constexpr int W = StateVec<T>::width, pieces = HiddenVec<T>::width / W;
  constexpr bool whole = L > 0 && L % W == 0;  // a state is whole vectors, without padding
  const int64_t S = L > 0 ? L : bw.g.S, sent_len = kNeighbours * S, Hp = bw.w.Hp, Ks = bw.w.Ks;
  const bool residual = bw.g.update == kResidual;
  const T* zeros = s.zeros.data();
  T* dinput = s.dinput.data();
  matmul<kHiddenBytes>(DenseRows<T>{s.dhid.data(), Hp, Hp}, count, bw.w.w1.template data_ptr<T>(), Ks, nullptr,
         [&](int64_t c, int64_t col, HV* a, auto rv) {
           for (int r = 0; r < decltype(rv)::value; ++r)
             for (int p = 0; p < pieces; ++p) {
               V piece;
               __builtin_memcpy(&piece, reinterpret_cast<const char*>(&a[r]) + p * sizeof(V), sizeof(V));
               const int64_t j = col + (r * pieces + p) * W;
               if (whole && bw.scatter && j < sent_len) {
                 const int slot = static_cast<int>(j / S);
                 const T* read = rows.row(c, slot);
                 if (read != zeros) {
                   T* o = out + (read - st) + (j - slot * S);
                   vstore(o, vload<V>(o) + piece);
                 }
               } else if (!bw.scatter && j + W <= sent_len) {
                 vstore(bw.sent + (n0 + c) * sent_len + j, piece);
               } else if (whole && j >= sent_len && j < sent_len + S) {
                 const int64_t at = (n0 + c) * S + j - sent_len;
                 const V own = residual ? piece + vload<V>(gp + at) : piece;
                 vstore(out + at, bw.scatter ? vload<V>(out + at) + own : own);
               } else {
                 vstore(dinput + c * Ks + j, piece);
               }
             }
         });
  if constexpr (!whole) {  // what the epilogue left in dinput: with the scatter, all 7S values of each cell;
    // without, the vectors that straddle two slots (whole vectors of sent values went straight to bw.sent)
    const int64_t sent_vectors_end = sent_len / W * W;
    for (int64_t l = 0; l < count; ++l) {
      const int64_t n = n0 + l;
      const T* d = dinput + l * Ks;
      if (bw.scatter) {
        for (int slot = 0; slot < kNeighbours; ++slot) {
          const T* read = rows.row(l, slot);
          if (read != zeros) add_into(out + (read - st), d + slot * S, S);
        }
      } else {
        for (int64_t j = sent_vectors_end; j < sent_len; ++j) bw.sent[n * sent_len + j] = d[j];
      }
      const T* own = d + sent_len;
      for (int64_t c = 0; c < S; ++c) {
        const T v = own[c] + (residual ? gp[n * S + c] : T(0));
        out[n * S + c] = bw.scatter ? out[n * S + c] + v : v;
      }
    }
  }
}

// The backward of one tile of step t (mirrors forward_tile): recompute the step, then push the upstream
// gradient `gp` through tanh and W2 (change_gradient), the activation (hidden_gradient) and W1
// (input_gradient), adding both layers' weight gradients to this thread's accumulators on the way.
template <int L, typename T>
void backward_tile(const Backward<T>& bw, int64_t t, int64_t n0, int64_t count, const T* gp, T* out,
                   TileScratch<T>& s) {
  const Geometry& g = bw.g;
  const int64_t S = L > 0 ? L : g.S, Hp = bw.w.Hp, Sp = bw.w.Sp;
  const WeightGrads<T> grads = bw.thread_grads();
  const T* st = bw.traj + t * bw.state_numel;
  // The change c after tanh: with update="replace" it is the next saved state itself, so only the hidden
  // activations are recomputed.
  const bool replace = g.update == kReplace;
  const auto rows = replace ? forward_tile<L>(g, bw.w, st, bw.external, n0, count, s, nullptr)
                            : forward_tile<L>(g, bw.w, st, bw.external, n0, count, s, store_rows(s.chg.data(), Sp));
  const T* change = replace ? st + bw.state_numel + n0 * S : s.chg.data();
  change_gradient<L>(bw, change, replace ? S : Sp, gp, n0, count, s, grads.b2);
  accumulate_outer<kHiddenBytes>(DenseRows<T>{s.chg.data(), Sp, Sp}, count, s.hid.data(), grads.w2, Hp);
  hidden_gradient(bw, n0, count, s, grads.b1);
  accumulate_outer<kHiddenBytes>(rows, count, s.dhid.data(), grads.w1t, Hp);
  input_gradient<L>(bw, rows, st, gp, out, n0, count, s);
}

// The tile pass over the cells n_begin .. n_end of step t (mirrors forward_cells).
template <int L, typename T>
void backward_cells(const Backward<T>& bw, int64_t t, int64_t n_begin, int64_t n_end, const T* gp, T* out,
                    TileScratch<T>& s) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) backward_tile<L>(bw, t, n0, std::min(kTile, n_end - n0), gp, out, s);
}

// The gather pass over the cells n_begin .. n_end: add the gradients sent back by the cells that read each
// one (and by itself through a reflecting edge).
template <int L, typename T>
void gather_sent(const Backward<T>& bw, int64_t n_begin, int64_t n_end, T* out) {
  const Geometry& g = bw.g;
  const int64_t S = L > 0 ? L : g.S, sent_len = kNeighbours * S;
  int64_t b = n_begin / g.cells, cell = n_begin - b * g.cells;
  const T* sample = bw.sent + b * g.cells * sent_len;
  for (int64_t n = n_begin; n < n_end; ++n) {
    T* o = out + n * S;
    const int64_t* offsets = bw.readers.offset.data() + cell * kNeighbours;
    for (int slot = 0; slot < kNeighbours; ++slot)
      if (offsets[slot] >= 0) add_into(o, sample + offsets[slot], S);
    if (bw.readers.any_self)
      for (int slot = 0; slot < kNeighbours; ++slot)
        if (bw.readers.self[cell * kNeighbours + slot]) add_into(o, bw.sent + n * sent_len + slot * S, S);
    if (++cell == g.cells) {
      cell = 0;
      sample += g.cells * sent_len;
    }
  }
}

// The state gradients that pass from step to step: step t + 1's (`upstream`: first the final state's
// gradient, read where it lies) and step t's (`written`), two buffers taking turns for the steps after the
// first, so the final state's gradient is never copied (and T = 1 needs one buffer).
template <typename T>
struct StepGradients {
  const T* upstream;
  T* written;
  T* spare;
  void next_step() {
    upstream = written;
    std::swap(written, spare);
  }
};

// All T steps, each thread taking whole samples (split_by_sample): the readers of a state add into its
// gradient (the scatter), which starts at zero; one thread writes the whole sample, so there is no race.
template <int L, typename T>
void backward_by_sample(const Backward<T>& bw, int64_t steps, const StepGradients<T>& gradients) {
  const Geometry& g = bw.g;
  const int64_t S = L > 0 ? L : g.S;
  at::parallel_for(0, g.B, 1, [&](int64_t b_begin, int64_t b_end) {
    TileScratch<T> s(g, bw.w);
    s.for_backward(bw.w);
    for (int64_t b = b_begin; b < b_end; ++b) {
      StepGradients<T> grads = gradients;
      const int64_t first = b * g.cells, last = first + g.cells;
      for (int64_t t = steps - 1; t >= 0; --t) {
        std::fill(grads.written + first * S, grads.written + last * S, T(0));
        backward_cells<L>(bw, t, first, last, grads.upstream, grads.written, s);
        grads.next_step();
      }
    }
  });
}

// The slabs of x-planes that backward_by_step cuts each sample into where it scatters: an even number, at most
// two per thread, each at least two planes thick, so that no two even (or two odd) slabs write the same state:
// a slab's cells are read only by cells within one plane of it, a periodic wrap included.  0 where the lattice
// is too thin (X < 4) to cut so.
inline int64_t scatter_slabs(const Geometry& g) {
  const int64_t slabs = std::min<int64_t>(2 * at::get_num_threads(), g.X / 2) / 2 * 2;
  return slabs >= 2 ? slabs : 0;
}

// All T steps, each step split across threads.  With the scatter, the x-planes of each sample are cut into
// slabs (scatter_slabs) and the even slabs, then the odd ones, run in parallel, adding the gradients they send
// straight into the states read, a barrier between.  Without (lattices of fewer than 4 x-planes), each step
// is split over tiles of cells, then gathered, a barrier between.
template <int L, typename T>
void backward_by_step(const Backward<T>& bw, int64_t steps, StepGradients<T> grads) {
  const Geometry& g = bw.g;
  if (bw.scatter) {
    const int64_t S = L > 0 ? L : g.S, plane = g.Y * g.Z, slabs = scatter_slabs(g);
    for (int64_t t = steps - 1; t >= 0; --t) {
      const T* gp = grads.upstream;
      T* out = grads.written;
      at::parallel_for(0, g.N * S, 1 << 14,
                       [&](int64_t begin, int64_t end) { std::fill(out + begin, out + end, T(0)); });
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t parity = 0; parity < 2; ++parity)
          at::parallel_for(0, slabs / 2, 1, [&](int64_t begin, int64_t end) {
            TileScratch<T> s(g, bw.w);
            s.for_backward(bw.w);
            for (int64_t i = begin; i < end; ++i) {
              const int64_t slab = 2 * i + parity, x0 = slab * g.X / slabs, x1 = (slab + 1) * g.X / slabs;
              backward_cells<L>(bw, t, (b * g.X + x0) * plane, (b * g.X + x1) * plane, gp, out, s);
            }
          });
      grads.next_step();
    }
    return;
  }
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T* gp = grads.upstream;
    T* out = grads.written;
    at::parallel_for(0, g.tiles(), 1, [&](int64_t begin, int64_t end) {
      TileScratch<T> s(g, bw.w);
      s.for_backward(bw.w);
      backward_cells<L>(bw, t, begin * kTile, std::min(end * kTile, g.N), gp, out, s);
    });
    at::parallel_for(0, g.N, 256, [&](int64_t begin, int64_t end) { gather_sent<L>(bw, begin, end, out); });
    grads.next_step();
  }
}

// The per-thread accumulators summed, the padding and transposes undone: (w1, b1, w2, b2) gradients.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_gradients(const Geometry& g,
                                                                            const PackedWeights<T>& w,
                                                                            const at::Tensor& acc) {
  const int64_t K = g.K, H = g.H, S = g.S, Hp = w.Hp, Sp = w.Sp;
  const at::Tensor sums = acc.sum(0);
  const at::Tensor gw1t = sums.narrow(0, 0, K * Hp).view({K, Hp});
  const at::Tensor gb1 = sums.narrow(0, K * Hp, Hp);
  const at::Tensor gw2 = sums.narrow(0, K * Hp + Hp, Sp * Hp).view({Sp, Hp});
  const at::Tensor gb2 = sums.narrow(0, K * Hp + Hp + Sp * Hp, Sp);
  // clone(): each gradient must own its storage (narrow views of one buffer would alias).
  return {gw1t.narrow(1, 0, H).t().clone(at::MemoryFormat::Contiguous), gb1.narrow(0, 0, H).clone(),
          gw2.narrow(0, 0, S).narrow(1, 0, H).clone(at::MemoryFormat::Contiguous), gb2.narrow(0, 0, S).clone()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_backward_cpu(
    const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& external,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t steps,
    int64_t boundary, int64_t activation, int64_t update, double step_size) {
  check_backward_args(grad_final, trajectory, external, w1, b1, w2, b2, steps, boundary, activation, update);
  TORCH_CHECK(trajectory.device().is_cpu(), "propagate_backward_cpu: tensors must be on the CPU");
  const at::Tensor traj = trajectory.contiguous(), u = external.contiguous();
  const Geometry g(traj[0], u, w1, boundary, activation, update, step_size);
  const bool by_sample = split_by_sample(g);
  const bool scatter = by_sample || scatter_slabs(g) > 0;
  const SlotReaders readers = scatter ? SlotReaders() : SlotReaders(g);
  // The final state's gradient, read in place, then the state gradients of the steps (StepGradients).
  const at::Tensor upstream = grad_final.contiguous();
  at::Tensor grad = at::empty_like(upstream);
  at::Tensor grad_spare = steps > 1 ? at::empty_like(upstream) : at::Tensor();
  at::Tensor grad_external = at::zeros_like(u);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_grads;

  AT_DISPATCH_FLOATING_TYPES(traj.scalar_type(), "propagate_backward_cpu", [&] {
    using T = scalar_t;
    const PackedWeights<T> w(g, w1, b1, w2, b2);
    at::Tensor sent = scatter ? at::Tensor() : at::empty({g.N, kNeighbours * g.S}, traj.options());
    const int64_t threads = at::get_num_threads();
    // (each thread's accumulators rounded up to whole cache lines, so that two threads never write to one line)
    const int64_t acc_size = (g.K * w.Hp + w.Hp + w.Hp * w.Sp + w.Sp + 15) / 16 * 16;
    at::Tensor acc = at::zeros({threads, acc_size}, traj.options());
    const Backward<T> bw{g, w, traj.data_ptr<T>(), traj[0].numel(), u.data_ptr<T>(), grad_external.data_ptr<T>(),
                         scatter, scatter ? nullptr : sent.data_ptr<T>(), readers,
                         update == kReplace ? T(1) : static_cast<T>(step_size), acc.data_ptr<T>(), acc_size, threads};
    with_state_length(g.S, [&](auto state_length) {
      constexpr int L = decltype(state_length)::value;
      const StepGradients<T> grads{upstream.data_ptr<T>(), grad.data_ptr<T>(),
                                   steps > 1 ? grad_spare.data_ptr<T>() : nullptr};
      if (by_sample) {
        backward_by_sample<L>(bw, steps, grads);
      } else {
        backward_by_step<L>(bw, steps, grads);
      }
    });
    // The first step writes the first buffer, the second the spare, and so on: after an even number of steps
    // the state gradient of step 0 is in the spare.
    if (steps % 2 == 0) std::swap(grad, grad_spare);
    weight_grads = weight_gradients(g, w, acc);
  });
  return {grad, grad_external, std::get<0>(weight_grads), std::get<1>(weight_grads), std::get<2>(weight_grads),
          std::get<3>(weight_grads)};
}

}  // namespace
