// The parts of the cell rule that the CPU and CUDA kernels share: the codes the Python front passes for
// boundary, activation and update, and how a cell finds the neighbour it reads through one slot.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define CUBECORE_HD __host__ __device__ __forceinline__
#else
#define CUBECORE_HD inline
#endif

namespace cubecore {

// Codes as passed by cubecore/ops/front.py (the position of the name in its tuple of choices in
// cubecore/ops/rule.py).
enum Neighbourhood : int64_t { kVonNeumann = 0, kMoore = 1 };
enum Boundary : int64_t { kZeros = 0, kCircular = 1, kReplicate = 2, kReflect = 3 };
enum Activation : int64_t { kTanh = 0, kRelu = 1, kSigmoid = 2 };
enum OutputActivation : int64_t { kOutputTanh = 0, kOutputIdentity = 1 };
enum Update : int64_t { kReplace = 0, kResidual = 1 };
// The precision of the update net's products (cubecore/ops/op_args.py's PRECISIONS): the inputs' own dtype
// ("ieee"), TF32, or bfloat16 / float16 operands, each with float32 (or the dtype's) accumulation.
enum Precision : int64_t { kIeee = 0, kTf32 = 1, kBf16 = 2, kFp16 = 3 };

// The state slots a cell reads in the von Neumann neighbourhood: six neighbours (x-1, x+1, y-1, y+1, z-1, z+1),
// then itself; in the Moore neighbourhood, the 27 cells of its 3x3x3 block in row-major (dx, dy, dz) order.
constexpr int kNeighbours = 6;
constexpr int kSlots = kNeighbours + 1;
constexpr int kMooreSlots = 27;
constexpr int kMaxSlots = kMooreSlots;

CUBECORE_HD int slots_of(int64_t neighbourhood) { return neighbourhood == kMoore ? kMooreSlots : kSlots; }

// The offset (dx, dy, dz) of a slot.
CUBECORE_HD void slot_offset(int64_t neighbourhood, int slot, int* dx, int* dy, int* dz) {
  if (neighbourhood == kMoore) {
    *dx = slot / 9 - 1;
    *dy = slot / 3 % 3 - 1;
    *dz = slot % 3 - 1;
    return;
  }
  *dx = *dy = *dz = 0;
  if (slot >= kNeighbours) return;
  const int d = (slot & 1) ? 1 : -1;
  if (slot < 2) *dx = d;
  else if (slot < 4) *dy = d;
  else *dz = d;
}

// The largest state size the CUDA kernels take: their backward gather keeps a cell's state gradient in a
// per-thread array of this length.  Python reads it from the extension (cubecore.ops.CUDA_MAX_STATE).
constexpr int kMaxCudaState = 64;

// The coordinate that a cell at `c` reads through offset `d` (-1, 0 or +1) on an axis of length `n`, or -1
// where it reads zeros.  (reflect reads the mirror cell, so it needs n >= 2: the front checks it.)
CUBECORE_HD int64_t neighbour_coord(int64_t c, int64_t d, int64_t n, int64_t boundary) {
  const int64_t v = c + d;
  if (v >= 0 && v < n) return v;
  if (boundary == kCircular) return v < 0 ? v + n : v - n;
  if (boundary == kReplicate) return v < 0 ? 0 : n - 1;
  if (boundary == kReflect) return v < 0 ? -v : 2 * n - 2 - v;
  return -1;
}

// Cell index (within one sample, row-major over X, Y, Z) that cell (x, y, z) reads through offset
// (dx, dy, dz), or -1 for zeros.
CUBECORE_HD int64_t cell_read(int64_t x, int64_t y, int64_t z, int dx, int dy, int dz, int64_t X, int64_t Y,
                              int64_t Z, int64_t boundary) {
  const int64_t u = neighbour_coord(x, dx, X, boundary), v = neighbour_coord(y, dy, Y, boundary),
                w = neighbour_coord(z, dz, Z, boundary);
  return (u < 0 || v < 0 || w < 0) ? -1 : (u * Y + v) * Z + w;
}

// The CUDA backward gathers instead of scattering: the coordinates r on an axis of length n that read the
// coordinate c through offset d (neighbour_coord(r, d, n, boundary) == c), into out[0..4), their number
// returned.  Besides r = c - d these are the wrapped c - d (circular), c itself (replicate, at an edge) and
// c + d (reflect: the edge cell reads its mirror); every candidate is checked, so small axes come out right.
CUBECORE_HD int readers_on_axis(int64_t c, int d, int64_t n, int64_t boundary, int64_t* out) {
  const int64_t candidates[4] = {c - d, ((c - d) % n + n) % n, c, c + d};
  int count = 0;
  for (int i = 0; i < 4; ++i) {
    const int64_t r = candidates[i];
    if (r < 0 || r >= n || neighbour_coord(r, d, n, boundary) != c) continue;
    bool seen = false;
    for (int j = 0; j < count; ++j) seen = seen || out[j] == r;
    if (!seen) out[count++] = r;
  }
  return count;
}

// Where forward step t (of `steps`) writes its states.  With a kept trajectory [steps + 1][state], its slot
// t + 1.  Without, the output is one state: two buffers alternate so that the final step lands in it, and
// `spare` takes the steps in between.
template <typename T>
inline T* step_destination(T* trajectory, T* spare, int64_t state_numel, int64_t t, int64_t steps, bool keep) {
  if (keep) return trajectory + (t + 1) * state_numel;
  return ((steps - 1 - t) % 2) == 0 ? trajectory : spare;
}

}  // namespace cubecore
