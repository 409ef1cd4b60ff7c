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

// ---- bfloat16 products (autocast to bfloat16 on a CPU with AVX512-BF16 or AMX) -----------------------------
//
// oneDNN's bf16 brgemm (through ATen's CPU BLAS) multiplies bfloat16 operands with float32 accumulation, at
// about twice the f32 rate (measured on the 2-core AMD EPYC VM with AVX512-BF16, one thread: M = 64 rows,
// N x K = 64 x 60: 213 GFLOP/s against 113; 64 x 64 x 20: 183 against 105).  Its B operand is VNNI-packed:
// pairs of K rows interleaved, [K/2][N][2] (K rounded up to even, the last pair's second row zeros).

// Rows of a VNNI-packed [K][N] operand: K rounded up to even.
inline int64_t vnni_rows(int64_t K) { return (K + 1) / 2 * 2; }

// out[k / 2][n][k % 2] = B[k][n] for k < K, n < N (B rows ldb apart), as bfloat16; out holds vnni_rows(K) * N.
inline void pack_vnni(const float* B, int64_t ldb, int64_t K, int64_t N, at::BFloat16* out) {
  for (int64_t k = 0; k < K; k += 2) {
    const float* r0 = B + k * ldb;
    const float* r1 = k + 1 < K ? r0 + ldb : nullptr;
    at::BFloat16* o = out + k * N;
    for (int64_t n = 0; n < N; ++n) {
      o[2 * n] = at::BFloat16(r0[n]);
      o[2 * n + 1] = r1 ? at::BFloat16(r1[n]) : at::BFloat16(0.0f);
    }
  }
}

// dst[m][k] = A[m][k] as bfloat16 (A rows lda apart, dst rows K apart).
inline void to_bf16(const float* A, int64_t lda, int64_t M, int64_t K, at::BFloat16* dst) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) dst[m * K + k] = at::BFloat16(A[m * lda + k]);
}

// C[M][N] = (accumulate ? C : 0) + A[M][K] @ B[K][N], A in bfloat16 rows K apart, B VNNI-packed N wide,
// float32 accumulation.
inline void tile_gemm_bf16(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, const at::BFloat16* B, float* C,
                           int64_t ldc, bool accumulate) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  at::native::cpublas::brgemm(M, N, K, K, N, ldc, accumulate, A, B, C, /*is_vnni=*/true);
#else
  TORCH_CHECK(false, "cubecore: this torch has no bf16 brgemm; bfloat16 products are never chosen here");
#endif
}

// Whether bfloat16 products run here at the library's speed: a CPU with AVX512-BF16 (every CPU with AMX has it
// too; elsewhere ATen's bf16 brgemm falls back to a plain loop, slower than the f32 one), and one tiny product
// that comes out right.
inline bool bf16_gemm_available() {
  static const bool available = [] {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12))
    if (!tile_gemm_available() || !__builtin_cpu_supports("avx512bf16")) return false;
#else
    return false;
#endif
    try {
      const float a[2] = {2.0f, 1.0f}, b[6] = {3.0f, 1.0f, 0.5f, 4.0f, 2.0f, 1.0f};  // A [1][2], B [2][3]
      at::BFloat16 a16[2], b16[6];
      to_bf16(a, 2, 1, 2, a16);
      pack_vnni(b, 3, 2, 3, b16);
      float c[3] = {0.0f, 0.0f, 0.0f};
      tile_gemm_bf16(1, 3, 2, a16, b16, c, 3, false);
      at::native::cpublas::brgemm_release(true);
      return c[0] == 10.0f && c[1] == 4.0f && c[2] == 2.0f;
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
