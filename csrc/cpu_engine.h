// Which engine of the CPU kernels runs a call's update net: per-cell vector loops (`cells`) or tile GEMMs
// (`tile_gemm`: a tile of cells gathered into a contiguous block, each layer one call of oneDNN's f32 brgemm
// micro-kernel through ATen's CPU BLAS, epilogues after).  Chosen once per call from the dtype and the sizes;
// Python asks the same function (cubecore._C.cpu_engine), so that info() and get_info() say what a call runs.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace cubecore {

enum CpuEngine : int { kCells = 0, kTileGemm = 1 };

// Cells per tile of each engine.  Per-cell loops keep a block of cells' accumulators in registers, so their
// tile only bounds the scratch; a tile GEMM's rows are its cells.  64 rows measured fastest on a 2-core AVX-512
// AMD EPYC VM at the 3D artefacts NCA's rule (scripts/compare_engines.py --tiles 32,64,128,256,512: at 16^3
// 64 / 128 / 256 / 512 rows 366 / 371 / 380 / 386 ms, at 24^3 32 / 64 / 128 rows 1286 / 1250 / 1271 ms).
constexpr int64_t kCellsTile = 32;
constexpr int64_t kGemmTile = 64;

// The tile-GEMM engine's tile: kGemmTile, or CUBECORE_GEMM_TILE (16 to 4096 cells) for measurements.
inline int64_t gemm_tile() {
  const char* forced = std::getenv("CUBECORE_GEMM_TILE");
  if (forced == nullptr || forced[0] == '\0') return kGemmTile;
  char* end = nullptr;
  const long long tile = std::strtoll(forced, &end, 10);
  TORCH_CHECK(*end == '\0' && tile >= 16 && tile <= 4096,
              "CUBECORE_GEMM_TILE must be a whole number of cells from 16 to 4096 (or unset), got '", forced, "'");
  return tile;
}

// C[M][N] = (accumulate ? C : 0) + A[M][K] @ B[K][N], row-major with leading dimensions lda, ldb, ldc.
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
#else
  TORCH_CHECK(false, "cubecore: this torch has no f32 brgemm; the tile-GEMM engine is never chosen here");
#endif
}

// Whether this torch's f32 brgemm runs on this CPU (oneDNN's micro-kernel needs x86-64 with AVX2 or newer):
// one tiny product, tried once.
inline bool tile_gemm_available() {
  static const bool available = [] {
#ifdef CPUBLAS_BRGEMM_F32F32F32
    try {
      const float a[1] = {2.0f}, b[1] = {3.0f};
      float c[1] = {0.0f};
      tile_gemm(1, 1, 1, a, 1, b, 1, c, 1, false);
      return c[0] == 6.0f;
    } catch (const std::exception&) {
      return false;
    }
#else
    return false;
#endif
  }();
  return available;
}

// CUBECORE_CPU_ENGINE=cells|tile_gemm forces an engine where it can run (for tests and measurements); unset or
// empty: the choice below.
inline int forced_cpu_engine() {
  const char* forced = std::getenv("CUBECORE_CPU_ENGINE");
  if (forced == nullptr || forced[0] == '\0') return -1;
  if (std::strcmp(forced, "cells") == 0) return kCells;
  if (std::strcmp(forced, "tile_gemm") == 0) return kTileGemm;
  TORCH_CHECK(false, "CUBECORE_CPU_ENGINE must be 'cells' or 'tile_gemm' (or unset), got '", forced, "'");
}

// The first hidden layer's width from which tile GEMMs run the update net faster than per-cell loops.
// Measured on a 2-core AVX-512 AMD EPYC VM, forward+backward, the engines alternating in one process
// (scripts/compare_engines.py --rounds 7, tile_gemm / cells): H = 16: 1.07 (S = 8, the original rule); H = 32:
// 1.11 (S = 8), 1.17 (S = 16); H = 64: 0.83 (S = 8), 0.93 (S = 16), 0.92 (the 3D artefacts NCA's 60 -> 64 -> 64
// -> 20); H = 96: 0.91 (S = 32); H = 128: 0.93 (S = 16).  The width decides, not the multiply-adds: S = 16,
// H = 32 (4,128 a cell) is 17% slower on GEMMs, S = 8, H = 64 (4,160) 17% faster.
constexpr int64_t kGemmMinHidden = 64;

// The engine of a call with this dtype (float32 or not) and first hidden layer of H1 values.  Tile GEMMs run
// float32 (the micro-kernel's type; float64 stays on the exact per-cell loops) where the first hidden layer is
// wide enough for them to win (kGemmMinHidden).
inline CpuEngine cpu_engine(bool float32, int64_t H1) {
  if (!float32 || !tile_gemm_available()) return kCells;
  const int forced = forced_cpu_engine();
  if (forced >= 0) return static_cast<CpuEngine>(forced);
  return H1 >= kGemmMinHidden ? kTileGemm : kCells;
}

inline const char* cpu_engine_name(CpuEngine engine) { return engine == kTileGemm ? "tile_gemm" : "cells"; }

}  // namespace cubecore
