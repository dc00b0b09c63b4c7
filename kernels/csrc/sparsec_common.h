// sparsec_common.h: the building blocks every C++ kernel family of sparsec shares (header-only;
// kernels/cpu.py puts kernels/csrc on the include path and hashes this file into the build's
// cache key, so an edit here rebuilds the extension).
//
//   - the instruction set: SPARSEC_AVX512 / SPARSEC_AVX2 / neither (portable), from the flags
//     kernels/cpu.py passes; the same source compiles to each. Accumulation is always fp32.
//   - element access: to_f, and the AVX loads that widen bf16 to fp32 (load16, load16m, load8)
//   - the active-row streaming behind activation sparsity (TEAL, CATS) and any method that
//     multiplies a sparse input by a weight stored transposed once (Wt = W^T, [K, N] row-major):
//     each *active input channel* is one contiguous row, a token reads only the rows of its
//     active channels, streamed sequentially; batches read the union of their active rows once
//     (accumulate_rows over axpy_rows / axpy_rows8 / axpy_rows_multi, with prefetch)
//   - the threshold compare "!(|x| <= t)" rather than "|x| > t": NaN inputs stay active and
//     propagate, as in the references (a dropped NaN would hide bad input); active_rows collects
//     the active channels of a batch, active_rows_scaled does the same with a per-channel scale
//     (the threshold-vector compare "!(|x_i| * s_i <= t)"), threshold_union the dense paths' s_t(x)
//   - the checks and the residual epilogue every op shares (sparsec_check_vector,
//     sparsec_add_residual, sparsec_threshold_ref, sparsec_cpu_has_amx_bf16)
//
// Everything here is inline or a template in namespace sparsec::cpu (with internal linkage, see
// below): each family's .cpp file (all in one extension) includes it and says
// `using namespace sparsec::cpu;`.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// The instruction set, from the flags kernels/cpu.py passes (-mavx512f/bw/vl, or -mavx2 -mfma,
// or nothing: the compiler auto-vectorises the portable loops). Code under SPARSEC_AVX512 or
// SPARSEC_AVX2 must keep a portable fallback: every build compiles the same sources.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SPARSEC_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSEC_AVX2 1
#endif

namespace sparsec {
namespace cpu {
// Internal linkage, on purpose (an unnamed namespace, as these helpers had inside each .cpp
// before): each family's file gets its own copy, specialised and inlined for its own callers,
// so one family's use never changes another's machine code, and the activation kernels compile
// to the same instructions as before the move (checked with objdump, AVX-512 and AVX2). As
// plain inline functions (one copy per instantiation in the extension, whichever file the
// linker meets first) GCC inlined differently in activation_sparse.cpp: threshold_union<T>
// became a call and accumulate_rows' tile loop grew by ~130 bytes. Inlining budgets are per
// file, too: instantiating active_rows_scaled in activation_sparse.cpp made GCC outline
// vector::push_back in active_rows' loop as well, so a new family's kernels go in its own .cpp.
namespace {

// the instruction set this build was compiled for (the module's isa())
inline const char* isa_name() {
#if defined(SPARSEC_AVX512)
  return "avx512";
#elif defined(SPARSEC_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

// ---- element access and the inner loops of the active-row streaming -------------------------

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

// Tuning (1 thread, cold weights, 4096x4096 / 4096x11008, speedup over F.linear; measured
// with accumulator tiles of 2048 / 8192 / 16384 floats, with and without prefetch):
//   fp32 b=1 s=0.9: 7.1 / 7.9 / 7.8x without prefetch, 8.4 / 8.5 / 8.5x with it
//   fp32 b=4 s=0.5: 1.13 / 1.47 / 1.51x without, 1.28 / 1.55 / 1.59x with
// so: one tile spans up to 16384 accumulator floats (64 KiB, all batch rows together; at
// batch 1 a whole output row of up to 16384 columns, so each weight row is one sequential
// stream), and the next group of rows is prefetched while the current one is summed.
#ifndef SPARSEC_ACC_FLOATS
#define SPARSEC_ACC_FLOATS 16384
#endif
#ifndef SPARSEC_PREFETCH
#define SPARSEC_PREFETCH 1
#endif
// accumulator floats per tile (all batch rows together): B * tile_n <= SPARSEC_ACC_FLOATS
inline int64_t tile_n_for(int64_t B) {
  // 12+ rows: half the budget keeps the accumulators nearer L1 (bf16, full density, batch 16:
  // 26.5 / 24.3 / 9.6 ms instead of 35.7 / 33.8 / 13.3 on 4096x11008 / 11008x4096 / 4096^2)
  const int64_t budget = B >= 12 ? SPARSEC_ACC_FLOATS / 2 : SPARSEC_ACC_FLOATS;
  int64_t t = (budget / B) & ~int64_t(15);
  return t < 256 ? 256 : t;
}
inline constexpr int ROWS = 4;  // active rows fused per pass over the accumulator tile

// ---- the inner loop: acc[b, 0:n] += sum_r c[r, b] * w_r[0:n] for ROWS rows ---------------

#if defined(SPARSEC_AVX512)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16m(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16m(const c10::BFloat16* p, __mmask16 m) {
  __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#elif defined(SPARSEC_AVX2)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
#endif

#if defined(SPARSEC_AVX512)
// Batch rows >= 2: the next group's rows at column j, once per cache line (next == nullptr: none).
template <typename T>
inline void prefetch_group(const T* const* next, int64_t j) {
#if SPARSEC_PREFETCH
  if (next && (j * sizeof(T)) % 64 == 0)
    for (int r = 0; r < ROWS; ++r) _mm_prefetch(reinterpret_cast<const char*>(next[r] + j), _MM_HINT_T0);
#endif
}

// Batch 1: each current row 4 KiB ahead of column j, running on into the next group's rows
// near a row's end (rows shorter than 4 KiB: the next group's rows at j, as above). The
// next-group-only prefetch asks for a whole group (4 rows x 16 KiB on 4096-wide weights) more
// than L1 holds, and each row's first lines after a 4 KiB page boundary come late. Measured
// (1 thread, cold, fp32, time of the old / this, medians of 41 interleaved samples, two runs):
// 4096x4096 s=0.5 1.18-1.19x, s=0.9 1.06-1.48x; 4096x11008 s=0.9 1.00-1.05x; 3072x576 s=0.9
// 1.25x; shorter rows unchanged (same addresses). At batch 4 the group prefetch stayed ahead
// (this was 0.92-0.99x of it), so batches keep prefetch_group.
template <typename T, int R>
inline void prefetch_ahead(const T* const* cur, const T* const* next, int64_t j, int64_t n) {
#if SPARSEC_PREFETCH
  if ((j * sizeof(T)) % 64 == 0) {
    const int64_t jj = j + std::min<int64_t>(4096 / static_cast<int64_t>(sizeof(T)), n);
    for (int r = 0; r < R; ++r) {
      const T* p = jj < n ? cur[r] + jj : (next ? next[r] + (jj - n) : nullptr);
      if (p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
    }
  }
#endif
}
#endif

#if defined(SPARSEC_AVX512)
// Batch 1: acc[0:n] += sum of 8 rows c_r w_r (two FMA chains). Eight row streams in flight
// instead of four hide more of each scattered row's start-up latency. Time of the 4-row pass
// / this one (1 thread, cold, fp32, s = 0.5 / 0.7 / 0.9, 41 interleaved samples, 2-3 runs):
// 4096x4096 1.06-1.15 / 1.07-1.09 / 1.05-1.10x, 4096x11008 1.09-1.20 / 1.07-1.21 / 1.18-1.21x,
// 11008x4096 1.05 / 1.07 / 1.09x, 576x1536 1.04-1.07 / 1.17-1.20 / 1.22-1.26x, 3072x576
// 0.97 / 1.02 / 1.13x, 960x576 1.05 / 1.41 / 1.21x. bf16 was mixed (4096x4096 0.92 / 0.99 /
// 0.82x, 11008x4096 1.12 / 1.18 / 1.23x, one run each), so bf16 keeps the 4-row pass.
inline constexpr int ROWS1 = 8;

template <typename T>
inline void axpy_rows8(float* acc, int64_t n, const T* const* w, const float* c, const T* const* next) {
  __m512 cc[ROWS1];
  for (int r = 0; r < ROWS1; ++r) cc[r] = _mm512_set1_ps(c[r]);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    prefetch_ahead<T, ROWS1>(w, next, j, n);
    __m512 a = _mm512_loadu_ps(acc + j);
    __m512 b = _mm512_mul_ps(cc[4], load16(w[4] + j));
    a = _mm512_fmadd_ps(cc[0], load16(w[0] + j), a);
    b = _mm512_fmadd_ps(cc[5], load16(w[5] + j), b);
    a = _mm512_fmadd_ps(cc[1], load16(w[1] + j), a);
    b = _mm512_fmadd_ps(cc[6], load16(w[6] + j), b);
    a = _mm512_fmadd_ps(cc[2], load16(w[2] + j), a);
    b = _mm512_fmadd_ps(cc[7], load16(w[7] + j), b);
    a = _mm512_fmadd_ps(cc[3], load16(w[3] + j), a);
    _mm512_storeu_ps(acc + j, _mm512_add_ps(a, b));
  }
  if (j < n) {
    const __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
    __m512 a = _mm512_maskz_loadu_ps(m, acc + j);
    __m512 b = _mm512_mul_ps(cc[4], load16m(w[4] + j, m));
    for (int r = 0; r < 4; ++r) a = _mm512_fmadd_ps(cc[r], load16m(w[r] + j, m), a);
    for (int r = 5; r < ROWS1; ++r) b = _mm512_fmadd_ps(cc[r], load16m(w[r] + j, m), b);
    _mm512_mask_storeu_ps(acc + j, m, _mm512_add_ps(a, b));
  }
}
#endif

template <typename T>
inline void axpy_rows(float* acc, int64_t n, const T* const* w, const float* c, const T* const* next) {
  // acc[0:n] += c0 w0 + c1 w1 + c2 w2 + c3 w3   (ROWS == 4; unused rows have c == 0)
  // next: the following group's rows, prefetched in lockstep (nullptr: none)
  int64_t j = 0;
#if defined(SPARSEC_AVX512)
  const __m512 c0 = _mm512_set1_ps(c[0]), c1 = _mm512_set1_ps(c[1]);
  const __m512 c2 = _mm512_set1_ps(c[2]), c3 = _mm512_set1_ps(c[3]);
  for (; j + 16 <= n; j += 16) {
    prefetch_ahead<T, ROWS>(w, next, j, n);
    __m512 a = _mm512_loadu_ps(acc + j);
    a = _mm512_fmadd_ps(c0, load16(w[0] + j), a);
    a = _mm512_fmadd_ps(c1, load16(w[1] + j), a);
    a = _mm512_fmadd_ps(c2, load16(w[2] + j), a);
    a = _mm512_fmadd_ps(c3, load16(w[3] + j), a);
    _mm512_storeu_ps(acc + j, a);
  }
  if (j < n) {
    const __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
    __m512 a = _mm512_maskz_loadu_ps(m, acc + j);
    a = _mm512_fmadd_ps(c0, load16m(w[0] + j, m), a);
    a = _mm512_fmadd_ps(c1, load16m(w[1] + j, m), a);
    a = _mm512_fmadd_ps(c2, load16m(w[2] + j, m), a);
    a = _mm512_fmadd_ps(c3, load16m(w[3] + j, m), a);
    _mm512_mask_storeu_ps(acc + j, m, a);
    j = n;
  }
#elif defined(SPARSEC_AVX2)
  const __m256 c0 = _mm256_set1_ps(c[0]), c1 = _mm256_set1_ps(c[1]);
  const __m256 c2 = _mm256_set1_ps(c[2]), c3 = _mm256_set1_ps(c[3]);
  for (; j + 8 <= n; j += 8) {
    __m256 a = _mm256_loadu_ps(acc + j);
    a = _mm256_fmadd_ps(c0, load8(w[0] + j), a);
    a = _mm256_fmadd_ps(c1, load8(w[1] + j), a);
    a = _mm256_fmadd_ps(c2, load8(w[2] + j), a);
    a = _mm256_fmadd_ps(c3, load8(w[3] + j), a);
    _mm256_storeu_ps(acc + j, a);
  }
#endif
  for (; j < n; ++j)
    acc[j] += c[0] * to_f(w[0][j]) + c[1] * to_f(w[1][j]) + c[2] * to_f(w[2][j]) + c[3] * to_f(w[3][j]);
}

#if defined(SPARSEC_AVX512)
// The same for B >= 2 batch rows: each weight vector is loaded (bf16: widened) once and
// applied to every batch row (on[b] == 0: row b has no active input in this group, skipped),
// where axpy_rows per row re-loaded and re-widened it B times. Same summation order, so the
// same results. bf16 at full density, 4096x11008: batch 4 16.0 -> 10.0 ms, batch 16 41.0 ->
// 35.7 ms (26.5 with the smaller tile below; oneDNN with AMX: 11.5 ms). fp32 batch 4 went
// from 1.46-1.52x to 1.90-1.93x of F.linear at s = 0.5, batch 16 at s = 0.9 from 1.5-1.7x to 2.4-2.7x.
template <typename T>
inline void axpy_rows_multi(float* acc, int64_t stride, int64_t B, int64_t n, const T* const* w, const float* c,
                            const uint8_t* on, const T* const* next) {
  // acc[b, j:j+16] += sum_r c[b, r] w_r[j:j+16] for every active token b (m: the lanes in range)
  auto apply = [&](int64_t j, __mmask16 m, __m512 w0, __m512 w1, __m512 w2, __m512 w3) {
    for (int64_t b = 0; b < B; ++b) {
      if (!on[b]) continue;
      const float* cb = c + ROWS * b;
      float* ap = acc + b * stride + j;
      __m512 a = _mm512_maskz_loadu_ps(m, ap);
      a = _mm512_fmadd_ps(_mm512_set1_ps(cb[0]), w0, a);
      a = _mm512_fmadd_ps(_mm512_set1_ps(cb[1]), w1, a);
      a = _mm512_fmadd_ps(_mm512_set1_ps(cb[2]), w2, a);
      a = _mm512_fmadd_ps(_mm512_set1_ps(cb[3]), w3, a);
      _mm512_mask_storeu_ps(ap, m, a);
    }
  };
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    prefetch_group(next, j);
    const __m512 w0 = load16(w[0] + j), w1 = load16(w[1] + j), w2 = load16(w[2] + j), w3 = load16(w[3] + j);
    apply(j, 0xFFFF, w0, w1, w2, w3);
  }
  if (j < n) {
    const __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
    apply(j, m, load16m(w[0] + j, m), load16m(w[1] + j, m), load16m(w[2] + j, m), load16m(w[3] + j, m));
  }
}
#endif

template <typename T>
inline float dot(const T* w, const float* x, int64_t n) {
  int64_t j = 0;
  float s = 0.f;
#if defined(SPARSEC_AVX512)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; j + 32 <= n; j += 32) {
    a0 = _mm512_fmadd_ps(load16(w + j), _mm512_loadu_ps(x + j), a0);
    a1 = _mm512_fmadd_ps(load16(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
  }
  for (; j + 16 <= n; j += 16) a0 = _mm512_fmadd_ps(load16(w + j), _mm512_loadu_ps(x + j), a0);
  if (j < n) {
    const __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
    a1 = _mm512_fmadd_ps(load16m(w + j, m), _mm512_maskz_loadu_ps(m, x + j), a1);
    j = n;
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(SPARSEC_AVX2)
  __m256 a0 = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) a0 = _mm256_fmadd_ps(load8(w + j), _mm256_loadu_ps(x + j), a0);
  alignas(32) float t[8];
  _mm256_store_ps(t, a0);
  for (int i = 0; i < 8; ++i) s += t[i];
#endif
  for (; j < n; ++j) s += to_f(w[j]) * x[j];
  return s;
}

// y[b, :] = bias + sum_i coef[i, b] * Wt[rows[i], :], over the active rows, in N tiles.
template <typename T>
void accumulate_rows(const T* wt, int64_t N, const std::vector<int64_t>& rows, const std::vector<float>& coef,
                     int64_t B, const T* bias, T* y) {
  const int64_t nact = static_cast<int64_t>(rows.size());
  const int64_t TILE_N = tile_n_for(B);
  const int64_t ntiles = (N + TILE_N - 1) / TILE_N;
  // a row of zeros stands in for the missing rows of the last group (only ever read)
  static const std::vector<T> zero_row(SPARSEC_ACC_FLOATS, T(0));
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    // per-thread accumulator, reused across calls: a fresh 64 KiB allocation and clear per call
    // cost ~10 us, as much as a small SmolLM2 GEMV
    thread_local std::vector<float> acc;
    if (acc.size() < static_cast<size_t>(B * TILE_N)) acc.resize(static_cast<size_t>(B * TILE_N));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * TILE_N, n = std::min(TILE_N, N - n0);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < n; ++j) acc[b * TILE_N + j] = bias ? to_f(bias[n0 + j]) : 0.f;
#if defined(SPARSEC_AVX512)
      if (B == 1 && sizeof(T) == 4) {
        for (int64_t i = 0; i < nact; i += ROWS1) {
          const T* w[ROWS1];
          const T* nx[ROWS1];
          float c[ROWS1];
          for (int r = 0; r < ROWS1; ++r) {
            w[r] = (i + r < nact) ? wt + rows[i + r] * N + n0 : zero_row.data();
            nx[r] = (i + ROWS1 + r < nact) ? wt + rows[i + ROWS1 + r] * N + n0 : zero_row.data();
            c[r] = (i + r < nact) ? coef[i + r] : 0.f;
          }
          axpy_rows8(acc.data(), n, w, c, nx);
        }
        for (int64_t j = 0; j < n; ++j) y[n0 + j] = static_cast<T>(acc[j]);
        continue;
      }
#endif
      for (int64_t i = 0; i < nact; i += ROWS) {
        const T* w[ROWS];
        const T* nx[ROWS];
        for (int r = 0; r < ROWS; ++r) {
          w[r] = (i + r < nact) ? wt + rows[i + r] * N + n0 : zero_row.data();
          nx[r] = (i + ROWS + r < nact) ? wt + rows[i + ROWS + r] * N + n0 : zero_row.data();
        }
#if defined(SPARSEC_AVX512)
        if (B > 1 && B <= 16) {
          float c[16 * ROWS];
          uint8_t on[16];
          for (int64_t b = 0; b < B; ++b) {
            for (int r = 0; r < ROWS; ++r) c[b * ROWS + r] = (i + r < nact) ? coef[(i + r) * B + b] : 0.f;
            on[b] = c[b * ROWS] != 0.f || c[b * ROWS + 1] != 0.f || c[b * ROWS + 2] != 0.f || c[b * ROWS + 3] != 0.f;
          }
          axpy_rows_multi(acc.data(), TILE_N, B, n, w, c, on, nx);
          continue;
        }
#endif
        bool first = true;
        for (int64_t b = 0; b < B; ++b) {
          float c[ROWS];
          for (int r = 0; r < ROWS; ++r) c[r] = (i + r < nact) ? coef[(i + r) * B + b] : 0.f;
          if (c[0] == 0.f && c[1] == 0.f && c[2] == 0.f && c[3] == 0.f) continue;  // row b inactive here
          axpy_rows(acc.data() + b * TILE_N, n, w, c, first ? nx : nullptr);
          first = false;
        }
      }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < n; ++j) y[b * N + n0 + j] = static_cast<T>(acc[b * TILE_N + j]);
    }
  });
}

// ---- which input channels are active ------------------------------------------------------

inline bool active(float v, float t) { return !(std::fabs(v) <= t); }

// The threshold-vector compare: channel i is active when !(|x_i| * s_i <= t), with a
// per-channel scale s (fp32 whatever x's dtype; e.g. R-Sparse's channel importance). The
// product is rounded to fp32 once and never fused with anything; NaN stays active, and so does
// an infinite input on a zero scale (inf * 0 is NaN).
inline bool active_scaled(float v, float s, float t) { return !(std::fabs(v) * s <= t); }

namespace detail {
// active_rows and active_rows_scaled share one body: SCALED compiles the per-channel scale in,
// and without it this is exactly the loop active_rows always was
template <bool SCALED>
inline bool active_at(float v, const float* scale, int64_t k, float t) {
  if constexpr (SCALED) {
    return active_scaled(v, scale[k], t);
  } else {
    (void)scale;
    (void)k;
    return active(v, t);
  }
}

template <bool SCALED, typename T>
void collect_active_rows(const T* x, int64_t B, int64_t K, const float* scale, float thr,
                         std::vector<int64_t>& rows, std::vector<float>& coef) {
  rows.reserve(K);
  coef.reserve(K * B);
#if defined(SPARSEC_AVX512)
  // 16 channels per compare, then one step per channel active somewhere: the branch per input
  // of the loop below mispredicts at every density in between (16 x 11008 fp32 at s = 0.9:
  // ~640 us, a fifth of the kernel's time; batch 1, 11008 inputs: ~30 us)
  if (B <= 16) {
    const __m512 t = _mm512_set1_ps(thr);
    alignas(64) float vals[16 * 16];  // [b][lane]: the thresholded inputs of this block
    for (int64_t k = 0; k < K; k += 16) {
      const int64_t n = std::min<int64_t>(16, K - k);
      const __mmask16 lanes = n == 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
      __m512 s = _mm512_setzero_ps();  // the lanes' scales (SCALED only)
      if constexpr (SCALED) s = _mm512_maskz_loadu_ps(lanes, scale + k);
      uint32_t any = 0;
      for (int64_t b = 0; b < B; ++b) {
        const __m512 v = load16m(x + b * K + k, lanes);
        const __m512 mag = SCALED ? _mm512_mul_ps(_mm512_abs_ps(v), s) : _mm512_abs_ps(v);
        const __mmask16 keep = _mm512_cmp_ps_mask(mag, t, _CMP_NLE_UQ) & lanes;  // NaN: active
        _mm512_store_ps(vals + 16 * b, _mm512_maskz_mov_ps(keep, v));
        any |= keep;
      }
      while (any) {
        const int l = __builtin_ctz(any);
        any &= any - 1;
        rows.push_back(k + l);
        for (int64_t b = 0; b < B; ++b) coef.push_back(vals[16 * b + l]);
      }
    }
    return;
  }
#endif
  for (int64_t k = 0; k < K; ++k) {
    bool any = false;
    for (int64_t b = 0; b < B; ++b) any |= active_at<SCALED>(to_f(x[b * K + k]), scale, k, thr);
    if (!any) continue;
    rows.push_back(k);
    for (int64_t b = 0; b < B; ++b) {
      const float v = to_f(x[b * K + k]);
      coef.push_back(active_at<SCALED>(v, scale, k, thr) ? v : 0.f);
    }
  }
}
}  // namespace detail

// The channels active in any of the B rows of x [B, K] (ascending) and their coefficients,
// coef[i * B + b] = x[b, rows[i]] where active in row b, else 0.
template <typename T>
void active_rows(const T* x, int64_t B, int64_t K, float thr, std::vector<int64_t>& rows, std::vector<float>& coef) {
  detail::collect_active_rows<false>(x, B, K, nullptr, thr, rows, coef);
}

// The same with the threshold-vector compare: channel k is active in row b when
// !(|x[b, k]| * scale[k] <= thr) (scale: K fp32 values). The coefficients stay the unscaled
// inputs, coef[i * B + b] = x[b, rows[i]] where active in row b, else 0.
template <typename T>
void active_rows_scaled(const T* x, int64_t B, int64_t K, const float* scale, float thr, std::vector<int64_t>& rows,
                        std::vector<float>& coef) {
  detail::collect_active_rows<true>(x, B, K, scale, thr, rows, coef);
}

inline void check2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), "sparsec cpu kernel: ", name,
              " must be a contiguous 2-D CPU tensor, got shape ", t.sizes(), " strides ", t.strides());
}

// ---- the dense paths' thresholding ---------------------------------------------------------

// xs = s_t(x) (NaN stays, as in the kernel) and the number of inputs active in any row, in
// one pass: the five ATen ops it replaces cost 0.3 ms at 16 x 4096, 7% of a bf16 GEMM.
#if defined(SPARSEC_AVX512)
// 16 inputs at a time: one compare gives the active lanes (!(|x| <= t), so NaN is active), a
// masked move zeroes the rest, and the lanes' masks OR into the union. The scalar loop below
// branched on each input: at half density that cost 1.3 ms for 16 x 11008 bf16 inputs (0.4 ms
// with every input active), 10% of the GEMM it feeds on 4096x11008.
inline void threshold16(const float* x, float* xs, __mmask16 lanes, __m512 t, uint16_t* any) {
  const __m512 v = _mm512_maskz_loadu_ps(lanes, x);
  const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_abs_ps(v), t, _CMP_NLE_UQ) & lanes;
  _mm512_mask_storeu_ps(xs, lanes, _mm512_maskz_mov_ps(keep, v));
  *any |= keep;
}
inline void threshold16(const c10::BFloat16* x, c10::BFloat16* xs, __mmask16 lanes, __m512 t, uint16_t* any) {
  const __m256i raw = _mm256_maskz_loadu_epi16(lanes, x);
  const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_abs_ps(v), t, _CMP_NLE_UQ) & lanes;
  _mm256_mask_storeu_epi16(xs, lanes, _mm256_maskz_mov_epi16(keep, raw));
  *any |= keep;
}
#endif

template <typename T>
int64_t threshold_union(const T* x, int64_t B, int64_t K, float thr, T* xs) {
#if defined(SPARSEC_AVX512)
  thread_local std::vector<uint16_t> any16;
  const int64_t nv = (K + 15) / 16;
  any16.assign(static_cast<size_t>(nv), 0);
  const __m512 t = _mm512_set1_ps(thr);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t k = v * 16, n = std::min<int64_t>(16, K - k);
      const __mmask16 lanes = n == 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
      threshold16(x + b * K + k, xs + b * K + k, lanes, t, &any16[v]);
    }
  int64_t n = 0;
  for (int64_t v = 0; v < nv; ++v) n += __builtin_popcount(any16[v]);
  return n;
#else
  thread_local std::vector<uint8_t> any;
  any.assign(static_cast<size_t>(K), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) {
      const bool a = active(to_f(x[b * K + k]), thr);
      xs[b * K + k] = a ? x[b * K + k] : T(0.f);
      any[k] |= a;
    }
  int64_t n = 0;
  for (int64_t k = 0; k < K; ++k) n += any[k];
  return n;
#endif
}

// threshold_union on a contiguous [B, K] float or bf16 tensor, into xs (same shape and dtype)
inline int64_t threshold_union(const at::Tensor& x, double thr, at::Tensor& xs) {
  const int64_t B = x.size(0), K = x.size(1);
  return x.scalar_type() == at::kFloat
             ? threshold_union(x.data_ptr<float>(), B, K, (float)thr, xs.data_ptr<float>())
             : threshold_union(x.data_ptr<c10::BFloat16>(), B, K, (float)thr, xs.data_ptr<c10::BFloat16>());
}

// ---- what every op shares -----------------------------------------------------------------

// s_t(x) for the dense paths of every kernel family: zero where |x| <= t, compared in fp32 (a bf16
// comparison rounds the threshold); NaN stays; t < 0: x unchanged
inline at::Tensor sparsec_threshold_ref(const at::Tensor& x, double thr) {
  if (thr < 0) return x;
  auto xa = (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) ? x.abs() : x.abs().to(at::kFloat);
  return at::where(xa.gt(thr).logical_or(x.isnan()), x, at::zeros({}, x.options()));
}

// whether this CPU has AMX for bf16 (the dense-path policies' library GEMMs use it)
inline bool sparsec_cpu_has_amx_bf16() {
  static const bool has = [] {
    auto caps = at::cpu::get_cpu_capabilities();
    auto it = caps.find("amx_bf16");
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  }();
  return has;
}

// A bias (or other per-output vector) the kernels read as a flat [n] array: a broadcastable
// [1] or [rows, n] one would be read past its end or misread, so it must be exactly [n].
inline void sparsec_check_vector(const c10::optional<at::Tensor>& t, int64_t n, const char* op, const char* what) {
  TORCH_CHECK(!t || (t->dim() == 1 && t->size(0) == n), "sparsec::", op, ": ", what, " must be [", n, "], got ",
              t->sizes());
}

// The residual-add epilogue (sparsec.codegen fuses ``residual + op(...)`` into the op): added in
// place to the op's fresh output, so no second output tensor. The shapes must match exactly
// (codegen fuses only same-shape, same-dtype adds): a broadcast here would be a silent change.
inline at::Tensor sparsec_add_residual(at::Tensor y, const c10::optional<at::Tensor>& residual, const char* op) {
  if (!residual) return y;
  TORCH_CHECK(residual->sizes() == y.sizes() && residual->scalar_type() == y.scalar_type(), "sparsec::", op,
              ": residual of shape ", residual->sizes(), " and dtype ", residual->scalar_type(),
              " does not match the output (", y.sizes(), ", ", y.scalar_type(), ")");
  return y.add_(*residual);
}

}  // namespace
}  // namespace cpu
}  // namespace sparsec
