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

// Vector accumulators a block keeps in registers: half the register file (32 with AVX-512VL, else 16).
#ifdef __AVX512VL__
constexpr int kAccumulators = 16;
#else
constexpr int kAccumulators = 8;
#endif
// Output vectors one product computes at a time; wider outputs are done in chunks of this many.  Four keeps
// the loads per FMA low: a block of 4 cells x 4 vectors loads 4 weight vectors and 4 inputs for 16 FMAs.
constexpr int kMaxVectors = 4;
// Segments of a cell's input row, at most: the states of its 27 slots (moore), then its external input.
constexpr int kMaxSegments = kMaxSlots + 1;

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
  int state_segments() const { return 0; }
  int64_t length_of(int) const { return length; }
  const T* row(int64_t i, int) const { return in + i * ld; }
};
// L > 0: the first `nstate` segments (the states of the slots a cell reads) are L values long, known when
// compiling, so their loops unroll.
template <typename T, int L = 0>
struct CellRows {
  static constexpr int kMaxBlock = 8;  // one pointer per cell of a block must fit the general registers
  static constexpr int kStateLength = L;
  const T* const* ptr;
  int nseg, nstate;
  const int64_t* lengths;
  int segments() const { return nseg; }
  int state_segments() const { return nstate; }
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
    if (L > 0 && s < rows.state_segments()) {
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
    const int64_t length = L > 0 && s < rows.state_segments() ? L : rows.length_of(s);
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

// The output activation of the update net (tanh or identity) and its slope, in terms of its output.
template <typename V>
inline V output_vec(V v, int64_t output_activation) {
  return output_activation == kOutputTanh ? tanh_vec(v) : v;
}
template <typename T>
inline T output_slope(T c, int64_t output_activation) {
  return output_activation == kOutputTanh ? T(1) - c * c : T(1);
}

// ---- the lattice ------------------------------------------------------------------------------------------

// The problem of one call: sizes, the rule's codes, and the cell each slot reads.
struct Geometry {
  int64_t B, X, Y, Z, S, E;
  int64_t K;         // slots a cell reads: 7 (von Neumann) or 27 (Moore)
  int64_t F;         // depthwise filters per channel, 0 for concat perception
  int64_t H1, H2;    // hidden sizes (H2 = 0: one hidden layer)
  int64_t In;        // inputs of the first layer: K*S + E (concat) or S*F + E (depthwise)
  int64_t cells;     // X * Y * Z
  int64_t N;         // B * cells
  RuleOptions rule;       // the rule's codes and values (op_args.h)
  bool fire;              // a fire mask is given
  CpuEngine engine;       // per-cell loops or tile GEMMs (cpu_engine.h)
  int64_t tile;           // cells per tile of that engine
  int segments;                        // input segments of a cell's slots row: K, plus one when E > 0
  int64_t lengths[kMaxSegments];       // their lengths: S for each slot, then E
  int first_segments;                  // depthwise: segments of the first layer's row ([perception, external])
  int64_t first_lengths[2];            // depthwise: S*F, E
  std::vector<int64_t> neighbours;     // [cells][K]: the cell each slot reads (-1: zeros), the same per sample

  Geometry(const at::Tensor& state, const OpArgs& a)
      : B(state.size(0)), X(state.size(1)), Y(state.size(2)), Z(state.size(3)), S(state.size(4)),
        E(a.external.size(4)), K(slots_of(a.rule.neighbourhood)), F(a.perception ? a.perception->size(1) : 0),
        H1(a.w1.size(0)), H2(a.wh ? a.wh->size(0) : 0), In(a.w1.size(1)), rule(a.rule),
        fire(a.fire_mask.has_value()) {
    engine = cpu_engine(state.scalar_type() == at::kFloat, H1);
    tile = engine == kTileGemm ? gemm_tile() : kCellsTile;
    cells = X * Y * Z;
    N = B * cells;
    segments = static_cast<int>(K) + (E > 0 ? 1 : 0);
    for (int s = 0; s < K; ++s) lengths[s] = S;
    lengths[K] = E;
    first_segments = E > 0 ? 2 : 1;
    first_lengths[0] = S * F;
    first_lengths[1] = E;
    neighbours.resize(cells * K);
    for (int64_t x = 0; x < X; ++x)
      for (int64_t y = 0; y < Y; ++y)
        for (int64_t z = 0; z < Z; ++z)
          for (int slot = 0; slot < K; ++slot) {
            int dx, dy, dz;
            slot_offset(rule.neighbourhood, slot, &dx, &dy, &dz);
            neighbours[((x * Y + y) * Z + z) * K + slot] = cell_read(x, y, z, dx, dy, dz, X, Y, Z, rule.boundary);
          }
  }
  bool depthwise() const { return F > 0; }
  int64_t state_inputs() const { return depthwise() ? S * F : K * S; }  // first-layer inputs before external
  int64_t tiles() const { return (N + tile - 1) / tile; }
};

// The weights rearranged for the kernels: transposed where the kernels read them by input row, with feature
// dimensions padded to whole vectors (the padding is zeros, so padded lanes stay out of every result).  With
// depthwise perception a cell's perception is kept filter-major (index f*S + c, so that each filter is one
// pass of vector FMAs over the channels), and W1's perception columns are permuted to match.
template <typename T>
struct PackedWeights {
  int64_t H1p, H2p, Hlp, Sp, Ks;
  at::Tensor w1t;  // [In][H1p]:  W1^T (forward: input -> first hidden)
  at::Tensor b1;   // [H1p]
  at::Tensor wht;  // [H1p][H2p]: Wh^T (forward: first -> second hidden), two hidden layers only
  at::Tensor bh;   // [H2p]
  at::Tensor wh;   // [H2p][H1p]: Wh   (backward)
  at::Tensor wot;  // [Hlp][Sp]:  Wo^T (forward: last hidden -> change)
  at::Tensor bo;   // [Sp]
  at::Tensor wo;   // [Sp][Hlp]:  Wo   (backward: change gradient -> last hidden gradient)
  at::Tensor w1;   // [H1p][Ks]:  W1's state (or perception) columns (backward: -> their gradients)
  at::Tensor w1e;  // [E][H1p]:   W1's external columns, transposed (backward: -> external)
  at::Tensor w1x;  // [H1p][In]:  W1 with its columns in the kernels' order (tile GEMMs' backward: -> inputs)
  at::Tensor wp;   // [F][K][S]:  the depthwise perception, filter-major
  at::Tensor dead; // [S]:        the state of a dead cell
  // bfloat16 products (precision kBf16, tile GEMMs): w1t, wht, wot (forward) and wo, wh, w1x (backward) as the
  // GEMMs' B operands, VNNI-packed once per call (cpu_engine.h's pack_vnni); empty otherwise.
  std::vector<at::BFloat16> w1t16, wht16, wot16, wo16, wh16, w1x16;

  PackedWeights(const Geometry& g, const OpArgs& a)
      : H1p(padded<T, kHiddenBytes>(g.H1)),
        H2p(g.H2 ? padded<T, kHiddenBytes>(g.H2) : 0),
        Hlp(g.H2 ? H2p : H1p),
        Sp(padded<T, kStateBytes>(g.S)),
        Ks(padded<T, kHiddenBytes>(g.state_inputs())) {
    const int64_t H1 = g.H1, S = g.S, SI = g.state_inputs(), Hl = g.H2 ? g.H2 : g.H1;
    const at::Tensor &W1 = a.w1, &B1 = a.b1, &WO = a.wo, &BO = a.bo;
    const c10::optional<at::Tensor>&P = a.perception, &WH = a.wh, &BH = a.bh, &dead_state = a.dead_state;
    auto opts = W1.options();
    // W1's state columns in the kernels' order: slot-major for concat (as given), filter-major for depthwise.
    const at::Tensor w1s = g.depthwise()
                               ? W1.narrow(1, 0, SI).reshape({H1, S, g.F}).permute({0, 2, 1}).reshape({H1, SI})
                               : W1.narrow(1, 0, SI);
    w1t = at::zeros({g.In, H1p}, opts);
    w1t.narrow(0, 0, SI).narrow(1, 0, H1).copy_(w1s.t());
    w1t.narrow(0, SI, g.E).narrow(1, 0, H1).copy_(W1.narrow(1, SI, g.E).t());
    b1 = at::zeros({H1p}, opts);
    b1.narrow(0, 0, H1).copy_(B1);
    if (g.H2) {
      wht = at::zeros({H1p, H2p}, opts);
      wht.narrow(0, 0, H1).narrow(1, 0, g.H2).copy_(WH->t());
      bh = at::zeros({H2p}, opts);
      bh.narrow(0, 0, g.H2).copy_(*BH);
      wh = at::zeros({H2p, H1p}, opts);
      wh.narrow(0, 0, g.H2).narrow(1, 0, H1).copy_(*WH);
    }
    wot = at::zeros({Hlp, Sp}, opts);
    wot.narrow(0, 0, Hl).narrow(1, 0, S).copy_(WO.t());
    bo = at::zeros({Sp}, opts);
    bo.narrow(0, 0, S).copy_(BO);
    wo = at::zeros({Sp, Hlp}, opts);
    wo.narrow(0, 0, S).narrow(1, 0, Hl).copy_(WO);
    w1 = at::zeros({H1p, Ks}, opts);
    w1.narrow(0, 0, H1).narrow(1, 0, SI).copy_(w1s);
    w1e = at::zeros({g.E, H1p}, opts);
    w1e.narrow(1, 0, H1).copy_(W1.narrow(1, SI, g.E).t());
    if (g.engine == kTileGemm) w1x = w1t.t().contiguous();
    if (g.depthwise()) wp = P->permute({1, 2, 0}).contiguous();
    dead = dead_state ? dead_state->contiguous() : at::zeros({S}, opts);
    if constexpr (std::is_same_v<T, float>) {
      if (g.rule.precision == kBf16) {
        auto packed = [](const at::Tensor& B) {
          std::vector<at::BFloat16> out(vnni_rows(B.size(0)) * B.size(1));
          pack_vnni(B.data_ptr<float>(), B.size(1), B.size(0), B.size(1), out.data());
          return out;
        };
        w1t16 = packed(w1t);
        wot16 = packed(wot);
        wo16 = packed(wo);
        w1x16 = packed(w1x);
        if (g.H2) {
          wht16 = packed(wht);
          wh16 = packed(wh);
        }
      }
    }
  }
};

// Per-thread scratch for one tile (g.tile cells).
template <typename T>
struct TileScratch {
  std::vector<const T*> inputs;  // [tile][segments]: where each slot's state (and the external input) lies
  std::vector<const T*> first;   // depthwise: [tile][first_segments]: a cell's perception and external input
  std::vector<T> zeros;          // [S]: what a slot reads beyond a zeros boundary
  std::vector<T> perc;           // depthwise: [tile][S*F]: perception, filter-major
  std::vector<T> x1;             // tile GEMMs: [tile][In]: the first layer's inputs, gathered (im2col)
  std::vector<T> hid1;           // [tile][H1p]: first hidden activations
  std::vector<T> hid2;           // [tile][H2p]: second hidden activations
  std::vector<T> chg;            // [tile][Sp]: cell changes (backward: then their pre-activation gradients)
  std::vector<T> dhid1;          // backward: [tile][H1p]: gradients of the first hidden pre-activations
  std::vector<T> dhid2;          // backward: [tile][H2p]: gradients of the second hidden pre-activations
  std::vector<T> dinput;         // backward: [tile][Ks] (tile GEMMs: [tile][In]): gradients of the first layer's
                                 // state (or perception) inputs (tile GEMMs: and external inputs)
  std::vector<T> xt;             // backward, tile GEMMs: a layer's inputs transposed, [features][tile]
  std::vector<at::BFloat16> a16; // bfloat16 products: a GEMM's A operand, converted
  std::vector<at::BFloat16> b16; // bfloat16 products: a weight gradient's B operand (a tile's rows), VNNI-packed
  TileScratch(const Geometry& g, const PackedWeights<T>& w)
      : inputs(g.tile * kMaxSegments), first(g.tile * 2), zeros(g.S), perc(g.depthwise() ? g.tile * g.S * g.F : 0),
        x1(g.engine == kTileGemm ? g.tile * g.In : 0), hid1(g.tile * w.H1p), hid2(g.tile * w.H2p),
        chg(g.tile * w.Sp) {
    if (g.rule.precision == kBf16) {
      a16.resize(g.tile * std::max({g.In, w.H1p, w.H2p, w.Sp}));
      b16.resize(vnni_rows(g.tile) * std::max({w.H1p, w.H2p, w.Sp}));
    }
  }
  void for_backward(const Geometry& g, const PackedWeights<T>& w) {
    dhid1.resize(g.tile * w.H1p);
    dhid2.resize(g.tile * w.H2p);
    dinput.resize(g.tile * (g.engine == kTileGemm ? g.In : w.Ks));
    if (g.engine == kTileGemm) xt.resize(g.tile * std::max({g.In, w.H1p, w.Sp}));
  }
  const T* hid_last(const Geometry& g) const { return g.H2 ? hid2.data() : hid1.data(); }
};

// Points the segments of cells n0 .. n0 + count at their slots' states and their external input.
template <typename T, int L>
CellRows<T, L> cell_rows(const Geometry& g, const T* state, const T* external, int64_t n0, int64_t count,
                         TileScratch<T>& s) {
  const int nseg = g.segments, K = static_cast<int>(g.K);
  const int64_t S = L > 0 ? L : g.S;
  int64_t b = n0 / g.cells, cell = n0 - b * g.cells;
  const T* sample = state + b * g.cells * S;
  const T** row = s.inputs.data();
  for (int64_t l = 0; l < count; ++l, row += nseg) {
    const int64_t* reads = g.neighbours.data() + cell * K;
    for (int slot = 0; slot < K; ++slot) row[slot] = reads[slot] < 0 ? s.zeros.data() : sample + reads[slot] * S;
    if (nseg > K) row[K] = external + (n0 + l) * g.E;
    if (++cell == g.cells) {
      cell = 0;
      sample += g.cells * S;
    }
  }
  return CellRows<T, L>{s.inputs.data(), nseg, K, g.lengths};
}

// perc[f*S + c] = sum over the slots k of wp[f][k][c] * x_k[c] for c in [c0, c0 + RV * W): the sum over the
// slots stays in registers and each output is stored once (a sum through memory is a chain of loads and stores
// that stalls wherever a store's address aliases a later load's, as at power-of-two state sizes).
template <int RV, typename T>
inline void perceive_columns(const T* wf, const T* const* x, const int64_t* slot, int live, int64_t S, int64_t c0,
                             T* out) {
  using V = typename StateVec<T>::type;
  constexpr int W = StateVec<T>::width;
  V acc[RV] = {};
  for (int i = 0; i < live; ++i) {
    const T* wk = wf + slot[i] * S + c0;
    const T* xk = x[i] + c0;
#pragma GCC unroll 4
    for (int r = 0; r < RV; ++r) acc[r] += vload<V>(wk + r * W) * vload<V>(xk + r * W);
  }
#pragma GCC unroll 4
  for (int r = 0; r < RV; ++r) vstore(out + c0 + r * W, acc[r]);
}

#ifdef __AVX512F__
// The channels [c0, c0 + 16) of S, as an AVX-512 mask: a state in vectors of 16 floats, the last one masked, so
// that no size has a scalar tail.
inline __mmask16 channel_mask(int64_t S, int64_t c0) {
  return S - c0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (S - c0)) - 1);
}

// scatter_input_gradient of depthwise perception for float32 on AVX-512, filters f0 .. f0 + NF: slot by slot,
// the slot's perception weights and their gradient held in registers over the tile's cells (the gradient
// summed there, in cell order, and stored once), each cell's state gradient updated in place.
template <int NF, int L>
inline void depthwise_scatter(const Geometry& g, const CellRows<float, L>& slots, const float* st, float* out,
                              int64_t count, const float* zeros, const float* wp, float* grad_wp,
                              const float* dinput, int64_t ld, int64_t f0) {
  const int64_t S = L > 0 ? L : g.S, K = g.K;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c0 = 0; c0 < S; c0 += 16) {
      const __mmask16 m = channel_mask(S, c0);
      __m512 wk[NF], gk[NF];
      for (int j = 0; j < NF; ++j) {
        const int64_t at = ((f0 + j) * K + k) * S + c0;
        wk[j] = _mm512_maskz_loadu_ps(m, wp + at);
        gk[j] = _mm512_maskz_loadu_ps(m, grad_wp + at);
      }
      for (int64_t l = 0; l < count; ++l) {
        const float* read = slots.row(l, static_cast<int>(k));
        if (read == zeros) continue;
        float* o = out + (read - st) + c0;
        const float* d = dinput + l * ld + f0 * S + c0;
        const __m512 x = _mm512_maskz_loadu_ps(m, read + c0);
        __m512 acc = _mm512_maskz_loadu_ps(m, o);
        for (int j = 0; j < NF; ++j) {
          const __m512 df = _mm512_maskz_loadu_ps(m, d + j * S);
          acc = _mm512_fmadd_ps(wk[j], df, acc);
          gk[j] = _mm512_fmadd_ps(df, x, gk[j]);
        }
        _mm512_mask_storeu_ps(o, m, acc);
      }
      for (int j = 0; j < NF; ++j) _mm512_mask_storeu_ps(grad_wp + ((f0 + j) * K + k) * S + c0, m, gk[j]);
    }
}

// perceive_tile for float32 on AVX-512, filters f0 .. f0 + NF of one cell, whose live slots' states are x[i]:
// each state vector loaded once for all NF filters.
template <int NF>
inline void perceive_cell(const float* wp, const float* const* x, const int64_t* slot, int live, int64_t S,
                          int64_t K, int64_t f0, float* p) {
  for (int64_t c0 = 0; c0 < S; c0 += 16) {
    const __mmask16 m = channel_mask(S, c0);
    __m512 acc[NF];
    for (int j = 0; j < NF; ++j) acc[j] = _mm512_setzero_ps();
    for (int i = 0; i < live; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x[i] + c0);
      for (int j = 0; j < NF; ++j)
        acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, wp + ((f0 + j) * K + slot[i]) * S + c0), xv, acc[j]);
    }
    for (int j = 0; j < NF; ++j) _mm512_mask_storeu_ps(p + (f0 + j) * S + c0, m, acc[j]);
  }
}

// perceive_cell for two cells a and b that read all K slots: each weight vector loaded once for both.
template <int NF>
inline void perceive_pair(const float* wp, const float* const* xa, const float* const* xb, int64_t S, int64_t K,
                          int64_t f0, float* pa, float* pb) {
  for (int64_t c0 = 0; c0 < S; c0 += 16) {
    const __mmask16 m = channel_mask(S, c0);
    __m512 acc_a[NF], acc_b[NF];
    for (int j = 0; j < NF; ++j) acc_a[j] = acc_b[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m512 va = _mm512_maskz_loadu_ps(m, xa[k] + c0), vb = _mm512_maskz_loadu_ps(m, xb[k] + c0);
      for (int j = 0; j < NF; ++j) {
        const __m512 w = _mm512_maskz_loadu_ps(m, wp + ((f0 + j) * K + k) * S + c0);
        acc_a[j] = _mm512_fmadd_ps(w, va, acc_a[j]);
        acc_b[j] = _mm512_fmadd_ps(w, vb, acc_b[j]);
      }
    }
    for (int j = 0; j < NF; ++j) {
      _mm512_mask_storeu_ps(pa + (f0 + j) * S + c0, m, acc_a[j]);
      _mm512_mask_storeu_ps(pb + (f0 + j) * S + c0, m, acc_b[j]);
    }
  }
}
#endif

// The slots of cell l that read a state (not the zeros beyond a `zeros` boundary): their rows into x, their
// numbers into slot, their count returned.
template <typename T, int L>
inline int live_slots(const CellRows<T, L>& slots, int64_t l, int64_t K, const T* zeros, const T** x,
                      int64_t* slot) {
  int live = 0;
  for (int64_t k = 0; k < K; ++k) {
    const T* row = slots.row(l, static_cast<int>(k));
    if (row == zeros) continue;
    x[live] = row;
    slot[live++] = k;
  }
  return live;
}

// Depthwise perception of a tile: perc[l][f*S + c] = sum over slots k of wp[f][k][c] * state_k[c] (slots beyond
// a zeros boundary skipped).
template <int L, typename T>
void perceive_tile(const Geometry& g, const PackedWeights<T>& w, const CellRows<T, L>& slots, int64_t count,
                   TileScratch<T>& s) {
  constexpr int W = StateVec<T>::width;
  const int64_t S = L > 0 ? L : g.S, F = g.F, K = g.K;
  const T* wp = w.wp.template data_ptr<T>();
  const T* zeros = s.zeros.data();
  const T* x[kMaxSlots];
  int64_t slot[kMaxSlots];
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    auto reads_every_slot = [&](int64_t l) {
      for (int64_t k = 0; k < K; ++k)
        if (slots.row(l, static_cast<int>(k)) == zeros) return false;
      return true;
    };
    for (int64_t l = 0; l < count; ++l) {
      T* p = s.perc.data() + l * S * F;
      if (l + 1 < count && reads_every_slot(l) && reads_every_slot(l + 1)) {  // two inner cells at once
        const T* const* xa = &slots.ptr[l * slots.nseg];
        const T* const* xb = &slots.ptr[(l + 1) * slots.nseg];
        for (int64_t f0 = 0; f0 < F; f0 += 4) {
          switch (std::min<int64_t>(F - f0, 4)) {
            case 1: perceive_pair<1>(wp, xa, xb, S, K, f0, p, p + S * F); break;
            case 2: perceive_pair<2>(wp, xa, xb, S, K, f0, p, p + S * F); break;
            case 3: perceive_pair<3>(wp, xa, xb, S, K, f0, p, p + S * F); break;
            default: perceive_pair<4>(wp, xa, xb, S, K, f0, p, p + S * F); break;
          }
        }
        ++l;
        continue;
      }
      const int live = live_slots(slots, l, K, zeros, x, slot);
      for (int64_t f0 = 0; f0 < F; f0 += 4) {
        switch (std::min<int64_t>(F - f0, 4)) {
          case 1: perceive_cell<1>(wp, x, slot, live, S, K, f0, p); break;
          case 2: perceive_cell<2>(wp, x, slot, live, S, K, f0, p); break;
          case 3: perceive_cell<3>(wp, x, slot, live, S, K, f0, p); break;
          default: perceive_cell<4>(wp, x, slot, live, S, K, f0, p); break;
        }
      }
    }
    return;
  }
#endif
  for (int64_t l = 0; l < count; ++l) {
    T* p = s.perc.data() + l * S * F;
    if (S < W) {  // a state narrower than one vector: each slot's products added in turn
      std::fill(p, p + S * F, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T* xk = slots.row(l, static_cast<int>(k));
        if (xk == zeros) continue;
        for (int64_t f = 0; f < F; ++f) {
          const T* wk = wp + (f * K + k) * S;
          T* pf = p + f * S;
#pragma GCC ivdep
          for (int64_t c = 0; c < S; ++c) pf[c] += wk[c] * xk[c];
        }
      }
      continue;
    }
    const int live = live_slots(slots, l, K, zeros, x, slot);
    for (int64_t f = 0; f < F; ++f, p += S) {
      const T* wf = wp + f * K * S;
      int64_t c = 0;
      for (; c + 4 * W <= S; c += 4 * W) perceive_columns<4>(wf, x, slot, live, S, c, p);
      for (; c + W <= S; c += W) perceive_columns<1>(wf, x, slot, live, S, c, p);
      // the last vector overlaps the one before it, whose columns get the same sums again
      if (c < S) perceive_columns<1>(wf, x, slot, live, S, S - W, p);
    }
  }
}

// The first layer's input rows of a tile: its slots' states (concat) or its perception (depthwise), then its
// external input.
template <int L, typename T>
CellRows<T, L> first_rows(const Geometry& g, const CellRows<T, L>& slots, const T* external, int64_t n0,
                          int64_t count, TileScratch<T>& s) {
  if (!g.depthwise()) return slots;
  const int nseg = g.first_segments;
  for (int64_t l = 0; l < count; ++l) {
    s.first[l * nseg] = s.perc.data() + l * g.S * g.F;
    if (nseg > 1) s.first[l * nseg + 1] = external + (n0 + l) * g.E;
  }
  return CellRows<T, L>{s.first.data(), nseg, 0, g.first_lengths};
}

// The rows a tile's backward needs again: its slots' states, and its first layer's inputs.
template <typename T, int L>
struct TileRows {
  CellRows<T, L> slots, first;
};

// ---- tile GEMMs ------------------------------------------------------------------------------------------
//
// The tile-GEMM engine (cpu_engine.h): a tile's first-layer inputs are gathered into one contiguous block (the
// implicit GEMM's im2col: the neighbours are still read where they lie, nothing per step is kept), each layer
// is one call of the library's micro-kernel on the whole tile, and the epilogues (bias, activations, the
// update, the masks) run over its rows while they are still in L1/L2.  float32 only; T = double never gets here.

// x = f(x + bias) over rows [0, count) of a [count][n] block rows ld apart, n whole vectors of Bytes.
template <int Bytes, typename T, class F>
inline void bias_epilogue(T* x, int64_t ld, int64_t count, int64_t n, const T* bias, F&& f) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int W = Vec<T, Bytes>::width;
  for (int64_t c = 0; c < count; ++c) {
    T* row = x + c * ld;
    for (int64_t j = 0; j < n; j += W) vstore(row + j, f(vload<V>(row + j) + vload<V>(bias + j)));
  }
}

// The rows of `rows` (a tile's first-layer inputs: slots' states or perception, then external input) copied
// one after another into s.x1, [count][In].
template <int L, typename T>
inline void gather_inputs(const Geometry& g, const CellRows<T, L>& rows, int64_t count, TileScratch<T>& s) {
  T* x = s.x1.data();
  for (int64_t l = 0; l < count; ++l) {
    for (int seg = 0; seg < rows.segments(); ++seg) {
      if (L > 0 && seg < rows.state_segments()) {
        std::memcpy(x, rows.row(l, seg), L * sizeof(T));
        x += L;
      } else {
        const int64_t length = rows.length_of(seg);
        std::memcpy(x, rows.row(l, seg), length * sizeof(T));
        x += length;
      }
    }
  }
  (void)g;
}

// dst[j][i] = src[i][j] for i < rows, j < cols (src rows ld apart, dst rows `rows` apart), in 16 x 16 blocks.
template <typename T>
inline void transpose(const T* src, int64_t ld, int64_t rows, int64_t cols, T* dst) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16)
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      const int64_t i1 = std::min(i0 + 16, rows), j1 = std::min(j0 + 16, cols);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * rows + i] = src[i * ld + j];
    }
}

// C[M][N] = (accumulate ? C : 0) + A[M][K] @ B[K][N] on the tile-GEMM engine, in the call's precision: float32
// operands, or bfloat16 ones with float32 accumulation (A converted here; B the weight's copy VNNI-packed once
// per call, `B16`, or where that is null, packed here from B: a weight gradient's tile rows).
template <typename T>
inline void product(const Geometry& g, TileScratch<T>& s, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                    const T* B, int64_t ldb, const at::BFloat16* B16, T* C, int64_t ldc, bool accumulate) {
  if (g.rule.precision == kBf16) {
    to_bf16(A, lda, M, K, s.a16.data());
    if (B16 == nullptr) {
      pack_vnni(B, ldb, K, N, s.b16.data());
      B16 = s.b16.data();
    }
    tile_gemm_bf16(M, N, K, s.a16.data(), B16, C, ldc, accumulate);
  } else {
    tile_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

// forward_tile on the tile-GEMM engine (same contract).  Not inlined, here and in the backward, so that the
// per-cell engine's code is compiled as it is without them.
template <int L, typename T, class OnChange>
__attribute__((noinline)) TileRows<T, L> forward_tile_gemm(const Geometry& g, const PackedWeights<T>& w, const T* state,
                                        const T* external, int64_t n0, int64_t count, TileScratch<T>& s,
                                        OnChange&& on_change) {
  const CellRows<T, L> slots = cell_rows<T, L>(g, state, external, n0, count, s);
  if (g.depthwise()) perceive_tile<L>(g, w, slots, count, s);
  const CellRows<T, L> rows = first_rows<L>(g, slots, external, n0, count, s);
  if constexpr (std::is_same_v<T, float>) {
    using HV = typename HiddenVec<T>::type;
    using SV = typename StateVec<T>::type;
    constexpr int W = StateVec<T>::width;
    gather_inputs<L>(g, rows, count, s);
    const int64_t activation = g.rule.activation;
    auto act = [=](HV v) { return activate_vec(v, activation); };
    product(g, s, count, w.H1p, g.In, s.x1.data(), g.In, w.w1t.template data_ptr<T>(), w.H1p, w.w1t16.data(),
            s.hid1.data(), w.H1p, false);
    bias_epilogue<kHiddenBytes>(s.hid1.data(), w.H1p, count, w.H1p, w.b1.template data_ptr<T>(), act);
    if (g.H2) {
      product(g, s, count, w.H2p, w.H1p, s.hid1.data(), w.H1p, w.wht.template data_ptr<T>(), w.H2p,
              w.wht16.data(), s.hid2.data(), w.H2p, false);
      bias_epilogue<kHiddenBytes>(s.hid2.data(), w.H2p, count, w.H2p, w.bh.template data_ptr<T>(), act);
    }
    if constexpr (!std::is_same_v<std::decay_t<OnChange>, std::nullptr_t>) {
      product(g, s, count, w.Sp, w.Hlp, s.hid_last(g), w.Hlp, w.wot.template data_ptr<T>(), w.Sp, w.wot16.data(),
              s.chg.data(), w.Sp, false);
      const int64_t output_activation = g.rule.output_activation;
      const T* bo = w.bo.template data_ptr<T>();
      for (int64_t c = 0; c < count; ++c) {
        const T* row = s.chg.data() + c * w.Sp;
        for (int64_t col = 0; col < w.Sp; col += kMaxVectors * W) {
          SV acc[kMaxVectors];
          const int64_t rv = std::min<int64_t>(w.Sp - col, kMaxVectors * W) / W;
          for (int64_t r = 0; r < rv; ++r)
            acc[r] = output_vec(vload<SV>(row + col + r * W) + vload<SV>(bo + col + r * W), output_activation);
          switch (rv) {
            case 1: on_change(c, col, acc, std::integral_constant<int, 1>{}); break;
            case 2: on_change(c, col, acc, std::integral_constant<int, 2>{}); break;
            case 3: on_change(c, col, acc, std::integral_constant<int, 3>{}); break;
            default: on_change(c, col, acc, std::integral_constant<int, 4>{}); break;
          }
        }
      }
    }
  } else {
    TORCH_CHECK(false, "cubecore: the tile-GEMM engine runs float32 only");
  }
  return {slots, rows};
}

// Forward of one tile: the hidden activations into s.hid1 (and s.hid2), and on_change(c, col, acc, RV) the
// cell changes after the output activation, still in registers (on_change = nullptr: stop after the hidden
// activations).
template <int L, typename T, class OnChange>
inline TileRows<T, L> forward_tile(const Geometry& g, const PackedWeights<T>& w, const T* state, const T* external,
                                   int64_t n0, int64_t count, TileScratch<T>& s, OnChange&& on_change) {
  if (g.engine == kTileGemm)
    return forward_tile_gemm<L>(g, w, state, external, n0, count, s, std::forward<OnChange>(on_change));
  using HV = typename HiddenVec<T>::type;
  using SV = typename StateVec<T>::type;
  constexpr int W = HiddenVec<T>::width;
  const CellRows<T, L> slots = cell_rows<T, L>(g, state, external, n0, count, s);
  if (g.depthwise()) perceive_tile<L>(g, w, slots, count, s);
  const CellRows<T, L> rows = first_rows<L>(g, slots, external, n0, count, s);
  const int64_t activation = g.rule.activation;
  auto hidden_store = [&](T* hid, int64_t Hp) {
    return [=](int64_t c, int64_t col, HV* acc, auto rv) {
      for (int r = 0; r < decltype(rv)::value; ++r) vstore(hid + c * Hp + col + r * W, activate_vec(acc[r], activation));
    };
  };
  matmul<kHiddenBytes>(rows, count, w.w1t.template data_ptr<T>(), w.H1p, w.b1.template data_ptr<T>(),
                       hidden_store(s.hid1.data(), w.H1p));
  if (g.H2)
    matmul<kHiddenBytes>(DenseRows<T>{s.hid1.data(), w.H1p, w.H1p}, count, w.wht.template data_ptr<T>(), w.H2p,
                         w.bh.template data_ptr<T>(), hidden_store(s.hid2.data(), w.H2p));
  if constexpr (!std::is_same_v<std::decay_t<OnChange>, std::nullptr_t>) {
    const int64_t output_activation = g.rule.output_activation;
    matmul<kStateBytes>(DenseRows<T>{s.hid_last(g), w.Hlp, w.Hlp}, count, w.wot.template data_ptr<T>(), w.Sp,
                        w.bo.template data_ptr<T>(), [&](int64_t c, int64_t col, SV* acc, auto rv) {
                          for (int r = 0; r < decltype(rv)::value; ++r) acc[r] = output_vec(acc[r], output_activation);
                          on_change(c, col, acc, rv);
                        });
  }
  return {slots, rows};
}

// How the work is split over threads.  Samples are independent: where there are enough of them, each thread
// takes whole samples through every step, so that a sample's states stay in its core's caches and no step
// waits for another thread.  Otherwise each step is split across threads, with a barrier between steps (the
// forward over tiles of cells; the backward over slabs of x-planes, see scatter_slabs).
inline bool split_by_sample(const Geometry& g) {
  const int64_t threads = at::get_num_threads();
  return g.B % threads == 0 || g.B >= 4 * threads;
}

// One forward step of the cells n_begin .. n_end: state -> out, the change applied where `fire` (this step's
// mask, [N], or nullptr: everywhere) is set.
template <int L, typename T>
void forward_cells(const Geometry& g, const PackedWeights<T>& w, const T* state, const T* external, T* out,
                   const uint8_t* fire, int64_t n_begin, int64_t n_end, TileScratch<T>& s) {
  using V = typename StateVec<T>::type;
  constexpr int W = StateVec<T>::width;
  const int64_t S = L > 0 ? L : g.S, Sp = w.Sp;
  const bool whole_vectors = S == Sp;  // the changes can be written straight from the registers
  const bool residual = g.rule.update == kResidual;
  const T step = static_cast<T>(g.rule.step_size);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += g.tile) {
    const int64_t count = std::min(g.tile, n_end - n0);
    forward_tile<L>(g, w, state, external, n0, count, s, [&](int64_t c, int64_t col, V* acc, auto rv) {
      const bool fires = fire == nullptr || fire[n0 + c];
      for (int r = 0; r < decltype(rv)::value; ++r) {
        const int64_t at = (n0 + c) * S + col + r * W;
        if (whole_vectors) {
          if (!fires) {
            vstore(out + at, vload<V>(state + at));
          } else {
            vstore(out + at, residual ? vload<V>(state + at) + step * acc[r] : acc[r]);
          }
        } else {
          vstore(s.chg.data() + c * Sp + col + r * W, acc[r]);
        }
      }
    });
    if (whole_vectors) continue;
    for (int64_t l = 0; l < count; ++l) {
      const int64_t n = n0 + l;
      const T* c = s.chg.data() + l * Sp;
      if (fire != nullptr && !fire[n]) {
        std::copy(state + n * S, state + n * S + S, out + n * S);
        continue;
      }
      for (int64_t i = 0; i < S; ++i) out[n * S + i] = residual ? state[n * S + i] + step * c[i] : c[i];
    }
  }
}

// Whether the alive channel of `state` exceeds the threshold somewhere in the 3x3x3 block of cell n (cells
// beyond the lattice ignored, whatever the boundary).
template <typename T>
inline bool alive_at(const Geometry& g, const T* state, int64_t n) {
  const int64_t b = n / g.cells, cell = n - b * g.cells;
  const int64_t x = cell / (g.Y * g.Z), y = cell / g.Z % g.Y, z = cell % g.Z;
  const T* sample = state + b * g.cells * g.S + g.rule.alive_channel;
  const T threshold = static_cast<T>(g.rule.alive_threshold);
  for (int64_t u = std::max<int64_t>(x - 1, 0); u <= std::min(x + 1, g.X - 1); ++u)
    for (int64_t v = std::max<int64_t>(y - 1, 0); v <= std::min(y + 1, g.Y - 1); ++v)
      for (int64_t t = std::max<int64_t>(z - 1, 0); t <= std::min(z + 1, g.Z - 1); ++t)
        if (sample[((u * g.Y + v) * g.Z + t) * g.S] > threshold) return true;
  return false;
}

// The alive mask of one step for cells n_begin .. n_end: life[n] = alive before (in `before`) and after (in
// `after`, the step's result before masking).
template <typename T>
void alive_masks(const Geometry& g, const T* before, const T* after, uint8_t* life, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) life[n] = alive_at(g, before, n) && alive_at(g, after, n);
}

// The precisions the CPU kernels run the update net's products in: the inputs' own dtype, and bfloat16 on the
// tile-GEMM engine (float32) where the library's bf16 kernel runs (cpu_engine.h's bf16_gemm_available).
inline void check_cpu_precision(const Geometry& g) {
  TORCH_CHECK(g.rule.precision == kIeee || (g.rule.precision == kBf16 && g.engine == kTileGemm &&
                                            bf16_gemm_available()),
              "the CPU kernels run the update net's products in the inputs' dtype (precision code ", kIeee,
              "), or in bfloat16 (", kBf16, ") on the tile-GEMM engine of a CPU with AVX512-BF16; got precision code ",
              g.rule.precision, g.engine == kTileGemm ? "" : " on the per-cell engine");
}

// Dead cells (life[n] = 0) among n_begin .. n_end take the dead state.
template <typename T>
void bury(const Geometry& g, const T* dead, T* state, const uint8_t* life, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n)
    if (!life[n]) std::copy(dead, dead + g.S, state + n * g.S);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_forward_cpu(const at::Tensor& state, const OpArgs& a,
                                                                    bool keep_trajectory) {
  check_propagate_args(state, a);
  TORCH_CHECK(state.device().is_cpu(), "propagate_forward_cpu: tensors must be on the CPU");
  check_kernel_dtype(state, "CPU");
  const at::Tensor s0 = state.contiguous(), u = a.external.contiguous();
  const at::Tensor fires = a.fire_mask ? a.fire_mask->contiguous() : at::Tensor();
  const Geometry g(s0, a);
  check_cpu_precision(g);
  const bool alive = a.alive();
  const int64_t steps = a.steps;

  std::vector<int64_t> shape = {keep_trajectory ? steps + 1 : 1};
  for (int64_t d : s0.sizes()) shape.push_back(d);
  at::Tensor traj = at::empty(shape, s0.options());
  at::Tensor spare = keep_trajectory ? at::Tensor() : at::empty_like(s0);
  // The alive masks, one byte per cell and step: kept for the backward with the trajectory, else one step's.
  const int64_t life_steps = alive ? (keep_trajectory ? steps : 1) : 0;
  at::Tensor life = at::empty({life_steps, g.B, g.X, g.Y, g.Z}, s0.options().dtype(at::kByte));

  AT_DISPATCH_FLOATING_TYPES(s0.scalar_type(), "propagate_forward_cpu", [&] {
    using T = scalar_t;
    const PackedWeights<T> w(g, a);
    const T* first = s0.data_ptr<T>();
    const T* up = u.data_ptr<T>();
    const T* dead = w.dead.template data_ptr<T>();
    T* traj_p = traj.data_ptr<T>();
    T* spare_p = keep_trajectory ? nullptr : spare.data_ptr<T>();
    const uint8_t* fire_p = g.fire ? static_cast<const uint8_t*>(fires.data_ptr()) : nullptr;
    uint8_t* life_p = alive ? life.data_ptr<uint8_t>() : nullptr;
    auto destination = [&](int64_t t) { return step_destination(traj_p, spare_p, s0.numel(), t, steps, keep_trajectory); };
    auto fire_at = [&](int64_t t) { return fire_p ? fire_p + t * g.N : nullptr; };
    auto life_at = [&](int64_t t) { return life_p + (keep_trajectory ? t * g.N : 0); };
    with_state_length(g.S, [&](auto state_length) {
      constexpr int L = decltype(state_length)::value;
      if (split_by_sample(g)) {
        at::parallel_for(0, g.B, 1, [&](int64_t b_begin, int64_t b_end) {
          TileScratch<T> s(g, w);
          for (int64_t b = b_begin; b < b_end; ++b) {
            const int64_t n_begin = b * g.cells, n_end = n_begin + g.cells;
            const T* cur = first;
            for (int64_t t = 0; t < steps; ++t) {
              T* out = destination(t);
              forward_cells<L>(g, w, cur, up, out, fire_at(t), n_begin, n_end, s);
              if (alive) {
                alive_masks(g, cur, out, life_at(t), n_begin, n_end);
                bury(g, dead, out, life_at(t), n_begin, n_end);
              }
              cur = out;
            }
          }
        });
      } else {
        const T* cur = first;
        for (int64_t t = 0; t < steps; ++t) {
          T* out = destination(t);
          at::parallel_for(0, g.tiles(), 1, [&](int64_t begin, int64_t end) {
            TileScratch<T> s(g, w);
            forward_cells<L>(g, w, cur, up, out, fire_at(t), begin * g.tile, std::min(end * g.tile, g.N), s);
          });
          if (alive) {  // every cell's result first, then the masks (they read neighbours), then the burial
            at::parallel_for(0, g.N, 256, [&](int64_t b, int64_t e) { alive_masks(g, cur, out, life_at(t), b, e); });
            at::parallel_for(0, g.N, 256, [&](int64_t b, int64_t e) { bury(g, dead, out, life_at(t), b, e); });
          }
          cur = out;
        }
      }
    });
    if (keep_trajectory) traj[0].copy_(s0);
  });
  auto outputs = forward_outputs(traj, keep_trajectory);
  if (!keep_trajectory) life = life.narrow(0, 0, 0);
  return {std::get<0>(outputs), std::get<1>(outputs), life};
}

// ---- the backward -----------------------------------------------------------------------------------------

// The weight gradients of one thread: [w1^T (In x H1p) | b1 (H1p) | wh^T (H1p x H2p) | bh (H2p) | wo (Sp x Hlp)
// | bo (Sp) | wp (F x K x S)], summed over threads once at the end.  The matrices are laid out with their
// outputs' features last, so that every sum runs on hidden-width vectors.
template <typename T>
struct WeightGrads {
  T *w1t, *b1, *wh, *bh, *wo, *bo, *wp;
};

struct GradOffsets {
  int64_t w1t, b1, wh, bh, wo, bo, wp, size;
  template <typename T>
  GradOffsets(const Geometry& g, const PackedWeights<T>& w) {
    w1t = 0;
    b1 = w1t + g.In * w.H1p;
    wh = b1 + w.H1p;
    bh = wh + w.H1p * w.H2p;
    wo = bh + w.H2p;
    bo = wo + w.Sp * w.Hlp;
    wp = bo + w.Sp;
    // (each thread's accumulators rounded up to whole cache lines, so that two threads never write to one line)
    size = (wp + g.F * g.K * g.S + 15) / 16 * 16;
  }
};

// What the passes of one backward call share: the problem, the packed weights, the saved states and masks,
// and where the gradients go.  A state's gradient reaches it from the cells that read it (its neighbours, and
// itself) by scatter: each reader adds straight into it, race-free because a thread owns whole samples, or a
// slab of planes that no slab run beside it reads (see scatter_slabs).
template <typename T>
struct Backward {
  const Geometry& g;
  const PackedWeights<T>& w;
  const T* traj;            // [T + 1][N][S]: the saved states
  int64_t state_numel;      // N * S
  const T* external;        // [N][E]
  T* grad_external;         // [N][E]
  const uint8_t* fire;      // [T][N]: where each step fired, or nullptr (everywhere)
  const uint8_t* life;      // [T][N]: where each step's cells lived, or nullptr (no alive mask)
  T change_scale;           // d next state / d change where a live cell fires: 1 (replace) or step_size (residual)
  T* acc;                   // [threads][offsets.size]: each thread's WeightGrads, on cache lines of its own
  GradOffsets offsets;
  int64_t threads;

  WeightGrads<T> thread_grads() const {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "unexpected thread number ", tid);
    T* base = acc + tid * offsets.size;
    return {base + offsets.w1t, base + offsets.b1, base + offsets.wh, base + offsets.bh,
            base + offsets.wo,  base + offsets.bo, base + offsets.wp};
  }
};

// Backward step 1 of a tile: the gradient at the change's pre-activation, output_slope * scale * upstream where
// a live cell fired (else zero), into s.chg (padded rows), and its sum into bo's gradient; and the state's own
// path past the change into `out` (residual: every live cell; replace: live cells that did not fire).
template <int L, typename T>
inline void change_gradient(const Backward<T>& bw, const T* change, int64_t change_ld, const T* gp, int64_t t,
                            int64_t n0, int64_t count, TileScratch<T>& s, T* grad_bo, T* out) {
  const Geometry& g = bw.g;
  const int64_t S = L > 0 ? L : g.S, Sp = bw.w.Sp;
  const bool residual = g.rule.update == kResidual;
  const uint8_t* fire = bw.fire ? bw.fire + t * g.N : nullptr;
  const uint8_t* life = bw.life ? bw.life + t * g.N : nullptr;
  T* dchg = s.chg.data();
  for (int64_t l = 0; l < count; ++l) {
    const int64_t n = n0 + l;
    const bool lives = life == nullptr || life[n], fired = fire == nullptr || fire[n];
    const T scale = lives && fired ? bw.change_scale : T(0);
    T* d = dchg + l * Sp;
    const T* c = change + l * change_ld;
    const T* go = gp + n * S;
    for (int64_t i = 0; i < S; ++i) d[i] = scale * go[i] * output_slope(c[i], g.rule.output_activation);
    for (int64_t i = S; i < Sp; ++i) d[i] = T(0);
    add_into(grad_bo, d, Sp);
    if (lives && (residual || !fired)) add_into(out + n * S, go, S);
  }
}

// Backward through one hidden layer: given the gradient at the next layer's pre-activations (`next`, rows of
// `next_len` values) and the next layer's weight W [next_len][Hp], the gradient at this layer's pre-activations,
// (W^T next) * act'(hid), into dhid, its sum into the bias's gradient, and for the first layer the external
// input's gradient (a dot product with W1's external columns).
template <typename T>
inline void hidden_gradient(const Backward<T>& bw, const T* next, int64_t next_len, const T* W, const T* hid,
                            T* dhid, int64_t Hp, bool first, int64_t n0, int64_t count, T* grad_bias) {
  using V = typename HiddenVec<T>::type;
  constexpr int W_ = HiddenVec<T>::width;
  const int64_t E = first ? bw.g.E : 0;
  const T* w1e = bw.w.w1e.template data_ptr<T>();
  matmul<kHiddenBytes>(DenseRows<T>{next, next_len, next_len}, count, W, Hp, nullptr,
         [&](int64_t c, int64_t col, V* a, auto rv) {
           constexpr int RV = decltype(rv)::value;
           for (int r = 0; r < RV; ++r) {
             const int64_t at = c * Hp + col + r * W_;
             const V d = a[r] * activation_slope_vec(vload<V>(hid + at), bw.g.rule.activation);
             a[r] = d;
             vstore(dhid + at, d);
             vstore(grad_bias + col + r * W_, vload<V>(grad_bias + col + r * W_) + d);
           }
           for (int64_t e = 0; e < E; ++e) {
             V dot = a[0] * vload<V>(w1e + e * Hp + col);
             for (int r = 1; r < RV; ++r) dot += a[r] * vload<V>(w1e + e * Hp + col + r * W_);
             bw.grad_external[(n0 + c) * E + e] += horizontal_sum(dot);
           }
         });
}

template <int L, typename T>
inline void scatter_input_gradient(const Backward<T>& bw, const CellRows<T, L>& slots, const T* st, T* out,
                                   int64_t count, TileScratch<T>& s, T* grad_wp, const T* dinput, int64_t ld);

// The last backward step of a tile: W1^T's state (or perception) columns times s.dhid1.  With concat
// perception these are the gradients of the states each cell read, added into `out` at the states read; with
// depthwise perception, the perception's gradient, from which the perception weight's gradient and the
// states' gradients follow.  Where a state is whole state-width vectors (concat), each piece of the product
// goes from the registers straight to the state it belongs to.
template <int L, typename T>
inline void input_gradient(const Backward<T>& bw, const CellRows<T, L>& slots, const T* st, T* out, int64_t count,
                           TileScratch<T>& s, T* grad_wp) {
  using HV = typename HiddenVec<T>::type;
  using V = typename StateVec<T>::type;
  constexpr int W = StateVec<T>::width, pieces = HiddenVec<T>::width / W;
  constexpr bool whole = L > 0 && L % W == 0;  // a state is whole vectors, without padding
  const Geometry& g = bw.g;
  const bool straight = whole && !g.depthwise();
  const int64_t S = L > 0 ? L : g.S, SI = g.state_inputs(), Ks = bw.w.Ks;
  const T* zeros = s.zeros.data();
  T* dinput = s.dinput.data();
  matmul<kHiddenBytes>(DenseRows<T>{s.dhid1.data(), bw.w.H1p, bw.w.H1p}, count, bw.w.w1.template data_ptr<T>(), Ks,
         nullptr, [&](int64_t c, int64_t col, HV* a, auto rv) {
           for (int r = 0; r < decltype(rv)::value; ++r)
             for (int p = 0; p < pieces; ++p) {
               V piece;
               __builtin_memcpy(&piece, reinterpret_cast<const char*>(&a[r]) + p * sizeof(V), sizeof(V));
               const int64_t j = col + (r * pieces + p) * W;
               if (!straight) {
                 vstore(dinput + c * Ks + j, piece);
               } else if (j < SI) {
                 const int slot = static_cast<int>(j / S);
                 const T* read = slots.row(c, slot);
                 if (read != zeros) {
                   T* o = out + (read - st) + (j - slot * S);
                   vstore(o, vload<V>(o) + piece);
                 }
               }
             }
         });
  if (straight) return;
  scatter_input_gradient<L>(bw, slots, st, out, count, s, grad_wp, dinput, Ks);
}

// The gradients of a tile's first-layer state (or perception) inputs, rows of `dinput` ld apart, sent to the
// states they were read from: added there (concat), or through the perception, whose weight's gradient
// follows on the way (depthwise).
template <int L, typename T>
inline void scatter_input_gradient(const Backward<T>& bw, const CellRows<T, L>& slots, const T* st, T* out,
                                   int64_t count, TileScratch<T>& s, T* grad_wp, const T* dinput, int64_t ld) {
  const Geometry& g = bw.g;
  const int64_t S = L > 0 ? L : g.S, K = g.K;
  const T* zeros = s.zeros.data();
  const T* wp = g.depthwise() ? bw.w.wp.template data_ptr<T>() : nullptr;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (g.depthwise()) {
      for (int64_t f0 = 0; f0 < g.F; f0 += 4) {
        switch (std::min<int64_t>(g.F - f0, 4)) {
          case 1: depthwise_scatter<1>(g, slots, st, out, count, zeros, wp, grad_wp, dinput, ld, f0); break;
          case 2: depthwise_scatter<2>(g, slots, st, out, count, zeros, wp, grad_wp, dinput, ld, f0); break;
          case 3: depthwise_scatter<3>(g, slots, st, out, count, zeros, wp, grad_wp, dinput, ld, f0); break;
          default: depthwise_scatter<4>(g, slots, st, out, count, zeros, wp, grad_wp, dinput, ld, f0); break;
        }
      }
      return;
    }
  }
#endif
  for (int64_t l = 0; l < count; ++l) {
    const T* d = dinput + l * ld;
    for (int64_t k = 0; k < K; ++k) {
      const T* read = slots.row(l, static_cast<int>(k));
      if (read == zeros) continue;
      T* o = out + (read - st);
      if (!g.depthwise()) {
        add_into(o, d + k * S, S);
        continue;
      }
      for (int64_t f = 0; f < g.F; ++f) {
        const T* wk = wp + (f * K + k) * S;
        const T* df = d + f * S;
        T* gk = grad_wp + (f * K + k) * S;
#pragma GCC ivdep
        for (int64_t c = 0; c < S; ++c) {
          gk[c] += df[c] * read[c];
          o[c] += wk[c] * df[c];
        }
      }
    }
  }
}

// backward_tile's hidden_gradient on the tile-GEMM engine: dhid = (next @ W) * act'(hid) for the tile's
// rows, its column sums into grad_bias (rows in order: the same sums at any thread count).
template <typename T>
inline void hidden_gradient_gemm(const Geometry& g, TileScratch<T>& s, const T* next, int64_t next_len, const T* W,
                                 const at::BFloat16* W16, const T* hid, T* dhid, int64_t Hp, int64_t count,
                                 T* grad_bias) {
  using V = typename HiddenVec<T>::type;
  constexpr int Wd = HiddenVec<T>::width;
  product(g, s, count, Hp, next_len, next, next_len, W, Hp, W16, dhid, Hp, false);
  for (int64_t j = 0; j < Hp; j += Wd) {  // a column at a time, its sum in a register
    V sum{};
    for (int64_t c = 0; c < count; ++c) {
      const int64_t at = c * Hp + j;
      const V d = vload<V>(dhid + at) * activation_slope_vec(vload<V>(hid + at), g.rule.activation);
      vstore(dhid + at, d);
      sum += d;
    }
    vstore(grad_bias + j, vload<V>(grad_bias + j) + sum);
  }
}

// backward_tile's passes after change_gradient on the tile-GEMM engine, each product one GEMM over the tile:
// the gradients pushed back as dX = dY W^T, the weight gradients dW += X^T dY into this thread's accumulators.
template <int L, typename T>
__attribute__((noinline)) void backward_products_gemm(const Backward<T>& bw, const TileRows<T, L>& rows,
                                                      const T* st, T* out, int64_t n0, int64_t count,
                                                      TileScratch<T>& s, const WeightGrads<T>& grads) {
  if constexpr (std::is_same_v<T, float>) {
    const Geometry& g = bw.g;
    const PackedWeights<T>& w = bw.w;
    const int64_t SI = g.state_inputs();
    T* xt = s.xt.data();
    transpose(s.chg.data(), w.Sp, count, w.Sp, xt);
    product(g, s, w.Sp, w.Hlp, count, xt, count, s.hid_last(g), w.Hlp, nullptr, grads.wo, w.Hlp, true);
    const T* wo = w.wo.template data_ptr<T>();
    if (g.H2) {
      hidden_gradient_gemm(g, s, s.chg.data(), w.Sp, wo, w.wo16.data(), s.hid2.data(), s.dhid2.data(), w.H2p, count,
                           grads.bh);
      transpose(s.hid1.data(), w.H1p, count, w.H1p, xt);
      product(g, s, w.H1p, w.H2p, count, xt, count, s.dhid2.data(), w.H2p, nullptr, grads.wh, w.H2p, true);
      hidden_gradient_gemm(g, s, s.dhid2.data(), w.H2p, w.wh.template data_ptr<T>(), w.wh16.data(), s.hid1.data(),
                           s.dhid1.data(), w.H1p, count, grads.b1);
    } else {
      hidden_gradient_gemm(g, s, s.chg.data(), w.Sp, wo, w.wo16.data(), s.hid1.data(), s.dhid1.data(), w.H1p, count,
                           grads.b1);
    }
    transpose(s.x1.data(), g.In, count, g.In, xt);
    product(g, s, g.In, w.H1p, count, xt, count, s.dhid1.data(), w.H1p, nullptr, grads.w1t, w.H1p, true);
    T* dinput = s.dinput.data();
    product(g, s, count, g.In, w.H1p, s.dhid1.data(), w.H1p, w.w1x.template data_ptr<T>(), g.In, w.w1x16.data(),
            dinput, g.In, false);
    for (int64_t l = 0; l < count; ++l)
      for (int64_t e = 0; e < g.E; ++e) bw.grad_external[(n0 + l) * g.E + e] += dinput[l * g.In + SI + e];
    scatter_input_gradient<L>(bw, rows.slots, st, out, count, s, grads.wp, dinput, g.In);
  } else {
    TORCH_CHECK(false, "cubecore: the tile-GEMM engine runs float32 only");
  }
}

// The backward of one tile of step t (mirrors forward_tile): recompute the step, then push the upstream
// gradient `gp` back through the output layer, the hidden layers and the first layer (and the perception),
// adding the weight gradients to this thread's accumulators on the way.
template <int L, typename T>
void backward_tile(const Backward<T>& bw, int64_t t, int64_t n0, int64_t count, const T* gp, T* out,
                   TileScratch<T>& s) {
  const Geometry& g = bw.g;
  const PackedWeights<T>& w = bw.w;
  const int64_t S = L > 0 ? L : g.S;
  const WeightGrads<T> grads = bw.thread_grads();
  const T* st = bw.traj + t * bw.state_numel;
  // With update="replace" and no masks the change is the next saved state itself, so only the hidden
  // activations are recomputed.
  const bool next_is_change = g.rule.update == kReplace && bw.fire == nullptr && bw.life == nullptr;
  const auto rows = next_is_change
                        ? forward_tile<L>(g, w, st, bw.external, n0, count, s, nullptr)
                        : forward_tile<L>(g, w, st, bw.external, n0, count, s, store_rows(s.chg.data(), w.Sp));
  const T* change = next_is_change ? st + bw.state_numel + n0 * S : s.chg.data();
  change_gradient<L>(bw, change, next_is_change ? S : w.Sp, gp, t, n0, count, s, grads.bo, out);
  if (g.engine == kTileGemm) return backward_products_gemm<L>(bw, rows, st, out, n0, count, s, grads);
  accumulate_outer<kHiddenBytes>(DenseRows<T>{s.chg.data(), w.Sp, w.Sp}, count, s.hid_last(g), grads.wo, w.Hlp);
  if (g.H2) {
    hidden_gradient(bw, s.chg.data(), w.Sp, w.wo.template data_ptr<T>(), s.hid2.data(), s.dhid2.data(), w.H2p,
                    false, n0, count, grads.bh);
    accumulate_outer<kHiddenBytes>(DenseRows<T>{s.hid1.data(), w.H1p, w.H1p}, count, s.dhid2.data(), grads.wh, w.H2p);
    hidden_gradient(bw, s.dhid2.data(), w.H2p, w.wh.template data_ptr<T>(), s.hid1.data(), s.dhid1.data(), w.H1p,
                    true, n0, count, grads.b1);
  } else {
    hidden_gradient(bw, s.chg.data(), w.Sp, w.wo.template data_ptr<T>(), s.hid1.data(), s.dhid1.data(), w.H1p,
                    true, n0, count, grads.b1);
  }
  accumulate_outer<kHiddenBytes>(rows.first, count, s.dhid1.data(), grads.w1t, w.H1p);
  input_gradient<L>(bw, rows.slots, st, out, count, s, grads.wp);
}

// The tile pass over the cells n_begin .. n_end of step t (mirrors forward_cells).
template <int L, typename T>
void backward_cells(const Backward<T>& bw, int64_t t, int64_t n_begin, int64_t n_end, const T* gp, T* out,
                    TileScratch<T>& s) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += bw.g.tile)
    backward_tile<L>(bw, t, n0, std::min(bw.g.tile, n_end - n0), gp, out, s);
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
    s.for_backward(g, bw.w);
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

// The slabs of x-planes that backward_by_step cuts each sample into: an even number, at most two per thread,
// each at least two planes thick, so that no two even (or two odd) slabs write the same state: a slab's cells
// are read only by cells within one plane of it, a circular wrap and a mirror included.  0 where the lattice is
// too thin (X < 4) to cut so.
inline int64_t scatter_slabs(const Geometry& g) {
  const int64_t slabs = std::min<int64_t>(2 * at::get_num_threads(), g.X / 2) / 2 * 2;
  return slabs >= 2 ? slabs : 0;
}

// All T steps, each step split across threads: the x-planes of each sample are cut into slabs (scatter_slabs)
// and the even slabs, then the odd ones, run in parallel, adding the gradients they send straight into the
// states read, a barrier between.
template <int L, typename T>
void backward_by_step(const Backward<T>& bw, int64_t steps, StepGradients<T> grads) {
  const Geometry& g = bw.g;
  const int64_t S = L > 0 ? L : g.S, plane = g.Y * g.Z, slabs = scatter_slabs(g);
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T* gp = grads.upstream;
    T* out = grads.written;
    at::parallel_for(0, g.N * S, 1 << 14, [&](int64_t begin, int64_t end) { std::fill(out + begin, out + end, T(0)); });
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t parity = 0; parity < 2; ++parity)
        at::parallel_for(0, slabs / 2, 1, [&](int64_t begin, int64_t end) {
          TileScratch<T> s(g, bw.w);
          s.for_backward(g, bw.w);
          for (int64_t i = begin; i < end; ++i) {
            const int64_t slab = 2 * i + parity, x0 = slab * g.X / slabs, x1 = (slab + 1) * g.X / slabs;
            backward_cells<L>(bw, t, (b * g.X + x0) * plane, (b * g.X + x1) * plane, gp, out, s);
          }
        });
    grads.next_step();
  }
}

// The per-thread accumulators summed, the padding, transposes and perception order undone: the gradients of
// (perception, w1, b1, wh, bh, wo, bo), undefined tensors for the absent ones.
template <typename T>
std::vector<at::Tensor> weight_gradients(const Geometry& g, const PackedWeights<T>& w, const GradOffsets& o,
                                         const at::Tensor& acc) {
  const int64_t H1 = g.H1, H2 = g.H2, S = g.S, SI = g.state_inputs(), Hl = H2 ? H2 : H1;
  const at::Tensor sums = acc.sum(0);
  auto part = [&](int64_t offset, int64_t rows, int64_t cols) {
    return sums.narrow(0, offset, rows * cols).view({rows, cols});
  };
  // clone / contiguous copies: each gradient must own its storage (narrow views of one buffer would alias).
  const at::Tensor gw1t = part(o.w1t, g.In, w.H1p).narrow(1, 0, H1);
  at::Tensor gw1 = at::empty({H1, g.In}, sums.options());
  const at::Tensor state_cols = gw1t.narrow(0, 0, SI).t();  // [H1][SI], filter-major for depthwise
  gw1.narrow(1, 0, SI).copy_(g.depthwise() ? state_cols.reshape({H1, g.F, S}).permute({0, 2, 1}).reshape({H1, SI})
                                           : state_cols);
  gw1.narrow(1, SI, g.E).copy_(gw1t.narrow(0, SI, g.E).t());
  std::vector<at::Tensor> out(7);
  const auto own = at::MemoryFormat::Contiguous;  // clone(own): a copy even where the view is contiguous
  if (g.depthwise()) out[0] = part(o.wp, g.F * g.K, S).view({g.F, g.K, S}).permute({2, 0, 1}).clone(own);
  out[1] = gw1;
  out[2] = sums.narrow(0, o.b1, H1).clone();
  if (H2) {
    out[3] = part(o.wh, w.H1p, w.H2p).narrow(0, 0, H1).narrow(1, 0, H2).t().clone(own);
    out[4] = sums.narrow(0, o.bh, H2).clone();
  }
  out[5] = part(o.wo, w.Sp, w.Hlp).narrow(0, 0, S).narrow(1, 0, Hl).clone(own);
  out[6] = sums.narrow(0, o.bo, S).clone();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
propagate_backward_cpu(const at::Tensor& grad_final, const at::Tensor& trajectory, const at::Tensor& life,
                       const OpArgs& a) {
  check_backward_args(grad_final, trajectory, life, a);
  TORCH_CHECK(trajectory.device().is_cpu(), "propagate_backward_cpu: tensors must be on the CPU");
  check_kernel_dtype(trajectory, "CPU");
  const at::Tensor traj = trajectory.contiguous(), u = a.external.contiguous();
  const at::Tensor fires = a.fire_mask ? a.fire_mask->contiguous() : at::Tensor();
  const at::Tensor lives = a.alive() ? life.contiguous() : at::Tensor();
  const Geometry g(traj[0], a);
  check_cpu_precision(g);
  const int64_t steps = a.steps;
  // Each thread takes whole samples where there are enough, or where the lattice is too thin to cut into slabs.
  const bool by_sample = split_by_sample(g) || scatter_slabs(g) == 0;
  // The final state's gradient, read in place, then the state gradients of the steps (StepGradients).
  const at::Tensor upstream = grad_final.contiguous();
  at::Tensor grad = at::empty_like(upstream);
  at::Tensor grad_spare = steps > 1 ? at::empty_like(upstream) : at::Tensor();
  at::Tensor grad_external = at::zeros_like(u);
  std::vector<at::Tensor> weight_grads;

  AT_DISPATCH_FLOATING_TYPES(traj.scalar_type(), "propagate_backward_cpu", [&] {
    using T = scalar_t;
    const PackedWeights<T> w(g, a);
    const GradOffsets offsets(g, w);
    const int64_t threads = at::get_num_threads();
    at::Tensor acc = at::zeros({threads, offsets.size}, traj.options());
    const Backward<T> bw{g, w, traj.data_ptr<T>(), traj[0].numel(), u.data_ptr<T>(), grad_external.data_ptr<T>(),
                         g.fire ? static_cast<const uint8_t*>(fires.data_ptr()) : nullptr,
                         a.alive() ? lives.data_ptr<uint8_t>() : nullptr,
                         g.rule.update == kReplace ? T(1) : static_cast<T>(g.rule.step_size), acc.data_ptr<T>(), offsets,
                         threads};
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
    weight_grads = weight_gradients(g, w, offsets, acc);
  });
  auto defined = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, traj.options()); };
  return {grad, grad_external, defined(weight_grads[0]), weight_grads[1], weight_grads[2], defined(weight_grads[3]),
          defined(weight_grads[4]), weight_grads[5], weight_grads[6]};
}

}  // namespace
