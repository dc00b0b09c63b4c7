// Activation-sparse CPU kernels for sparsec (built by kernels/cpu.py with torch cpp_extension).
//
//   sparse_linear(x[B,K], Wt[K,N], bias?, t)   y = s_t(x) Wt + b, s_t(x) = x * 1[!(|x| <= t)]
//   cats_mlp(x[B,H], a[B,I], Wup[I,H], bup?, Wdt[I,O], bdown?, t)
//        h = CATS_t(a) * (Wup x + bup);  y = h Wdt + bdown
//
// Why this layout: the weight is stored transposed once (Wt = W^T, [K, N] row-major), so
// each *active input channel* is one contiguous row. A token reads only the rows of its
// active channels, streamed sequentially; batches read the union of their active rows once.
// "!(|x| <= t)" rather than "|x| > t": NaN inputs stay active and propagate, as in the
// reference (a dropped NaN would hide bad input).
//
// ISA: chosen at build time by the flags kernels/cpu.py passes (-mavx512f/bw/vl, or -mavx2
// -mfma, or nothing); the same source compiles to each. Accumulation is always fp32.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SPARSEC_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSEC_AVX2 1
#endif

// nm_sparse.cpp
at::Tensor sparsec_nm_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions,
                             const c10::optional<at::Tensor>& bias, int64_t n, int64_t m, double thr);
at::Tensor sparsec_nm_linear_op(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions,
                                const c10::optional<at::Tensor>& bias, int64_t n, int64_t m, double thr,
                                bool dense_copy, const c10::optional<at::Tensor>& residual);
at::Tensor sparsec_add_residual(at::Tensor y, const c10::optional<at::Tensor>& residual, const char* op);
void sparsec_check_vector(const c10::optional<at::Tensor>& t, int64_t n, const char* op, const char* what);
bool sparsec_cpu_has_amx_bf16();
int64_t sparsec_nm_dense_copies(bool drop_dead);
bool sparsec_nm_drop_dense_copy(int64_t impl);
at::Tensor sparsec_threshold_ref(const at::Tensor& x, double thr);
at::Tensor sparsec_nm_unpack(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m,
                             int64_t in_features);

namespace {

const char* isa_name() {
#if defined(SPARSEC_AVX512)
  return "avx512";
#elif defined(SPARSEC_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

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
constexpr int ROWS = 4;  // active rows fused per pass over the accumulator tile

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
constexpr int ROWS1 = 8;

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

inline bool active(float v, float t) { return !(std::fabs(v) <= t); }

// The channels active in any of the B rows of x [B, K] (ascending) and their coefficients,
// coef[i * B + b] = x[b, rows[i]] where active in row b, else 0.
template <typename T>
void active_rows(const T* x, int64_t B, int64_t K, float thr, std::vector<int64_t>& rows, std::vector<float>& coef) {
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
      uint32_t any = 0;
      for (int64_t b = 0; b < B; ++b) {
        const __m512 v = load16m(x + b * K + k, lanes);
        const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_abs_ps(v), t, _CMP_NLE_UQ) & lanes;  // NaN: active
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
    for (int64_t b = 0; b < B; ++b) any |= active(to_f(x[b * K + k]), thr);
    if (!any) continue;
    rows.push_back(k);
    for (int64_t b = 0; b < B; ++b) {
      const float v = to_f(x[b * K + k]);
      coef.push_back(active(v, thr) ? v : 0.f);
    }
  }
}

template <typename T>
void sparse_linear_impl(const T* x, int64_t B, int64_t K, const T* wt, int64_t N, const T* bias, float thr, T* y) {
  std::vector<int64_t> rows;
  std::vector<float> coef;
  active_rows(x, B, K, thr, rows, coef);
  accumulate_rows(wt, N, rows, coef, B, bias, y);
}

template <typename T>
void cats_impl(const T* x, const T* a, int64_t B, int64_t H, int64_t I, const T* wup, const T* bup, const T* wdt,
               int64_t O, const T* bdown, float thr, T* y) {
  // the intermediate channels active in any row: the vectorised scan of sparse_linear (its
  // coefficients, the activations, go unused: the loop below re-reads a to keep a == 0 with a
  // negative threshold active, as in the reference)
  std::vector<int64_t> rows;
  std::vector<float> unused;
  active_rows(a, B, I, thr, rows, unused);
  const int64_t nact = static_cast<int64_t>(rows.size());
  std::vector<float> xf(static_cast<size_t>(B * H));
  for (int64_t i = 0; i < B * H; ++i) xf[i] = to_f(x[i]);
  // h[i, b] = CATS_t(a[b, j]) * (Wup[j] . x[b] + bup[j]): reads only the active rows of Wup
  std::vector<float> coef(static_cast<size_t>(nact * B));
  at::parallel_for(0, nact, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = rows[i];
      for (int64_t b = 0; b < B; ++b) {
        const float av = to_f(a[b * I + j]);
        if (!active(av, thr)) { coef[i * B + b] = 0.f; continue; }
        float u = dot(wup + j * H, xf.data() + b * H, H) + (bup ? to_f(bup[j]) : 0.f);
        // round the intermediate like the reference does (it materialises h in the dtype)
        coef[i * B + b] = to_f(static_cast<T>(av * to_f(static_cast<T>(u))));
      }
    }
  });
  // W_down^T rows are O wide: O is the MLP's output size, which need not equal its input H
  accumulate_rows(wdt, O, rows, coef, B, bdown, y);
}

void check2d(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), "sparsec cpu kernel: ", name,
              " must be a contiguous 2-D CPU tensor, got shape ", t.sizes(), " strides ", t.strides());
}

// Union density of active inputs above which a dense GEMM beats the kernel (>= 1: never).
// Measured here (1 thread, cold weights, bench/kernels.py and a full-density sweep; the
// kernel's time is about proportional to the density it reads):
//  - fp32 with AVX-512: never. MKL's GEMM at batch 8-16 (1 thread) streams 3-4 GB/s (28
//    GFLOP/s); the kernel at full density took 0.34-0.6x its time (batch 16: 4096x11008 33.2
//    vs 55.4 ms, 11008x4096 30.2 vs 56.6, 4096^2 11.2 vs 20.0; batch 8: 20.5 vs 53.9, 29.7 vs
//    50.4, 7.5 vs 21.8; 2 threads, batch 16: 23.1 vs 27.8 and 18.3 vs 29.6 ms). An earlier
//    measurement (kernel 0.91-0.94x of MKL at batch 16) had set a 0.9 limit, which made
//    batches 8-16 at density > 0.9 run at MKL's speed. Without AVX-512 the 0.9 limit stays.
//  - bf16 on a CPU with AMX: oneDNN's GEMM runs 10-12 ms on 4096x11008 from batch 2 on (the
//    kernel: 10.0 at batch 4, 13.7-17.8 at 8, 20 at 12, 24-27 at 16), but 20 ms at batch 1
//    (no AMX path for a GEMV): break-even about 1.0 at batch 2-4, 0.62-0.8 at 8, 0.52-0.64
//    at 12, 0.41-0.52 at 16.
//  - bf16 without AMX: the library GEMM is 2x slower, so the fp32 rule.
inline bool cpu_has_amx_bf16() { return sparsec_cpu_has_amx_bf16(); }

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
int64_t threshold_union(const at::Tensor& x, double thr, at::Tensor& xs) {
  const int64_t B = x.size(0), K = x.size(1);
  return x.scalar_type() == at::kFloat
             ? threshold_union(x.data_ptr<float>(), B, K, (float)thr, xs.data_ptr<float>())
             : threshold_union(x.data_ptr<c10::BFloat16>(), B, K, (float)thr, xs.data_ptr<c10::BFloat16>());
}

inline double dense_density_limit(at::ScalarType dtype, int64_t B) {
  if (dtype == at::kBFloat16 && cpu_has_amx_bf16()) {
    if (B <= 1) return 2.0;
    if (B <= 4) return 0.95;
    if (B <= 8) return 0.65;
    if (B <= 12) return 0.55;
    return 0.45;
  }
#if defined(SPARSEC_AVX512)
  (void)B;
  return 2.0;
#else
  return B >= 8 ? 0.9 : 2.0;
#endif
}

// The dense GEMM on thresholded inputs xs, on the original [out, in] layout where the graph
// passes it -- the weight of a lone linear, or the weights of a group fused into one call
// (one GEMM each): the library GEMMs on the transposed copy took longer (MKL fp32 1.04-1.19x
// at 16-128 rows, oneDNN bf16 1.7-2x at 4-16 rows on 4096x11008).
at::Tensor dense_linear(const at::Tensor& xs, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& weight, const c10::optional<at::TensorList>& group) {
  if (weight) return at::linear(xs, *weight, bias);
  if (group && !group->empty()) {
    std::vector<at::Tensor> parts;
    int64_t out = 0;
    for (const auto& w : *group) {
      parts.push_back(at::linear(xs, w));
      out += w.size(0);
    }
    TORCH_CHECK_VALUE(out == wt.size(1), "sparsec::sparse_linear: group_weights have ", out,
                      " output features together, weight_t has ", wt.size(1));
    auto y = at::cat(parts, -1);
    return bias ? y.add_(*bias) : y;
  }
  return at::linear(xs, wt.t(), bias);
}

torch::Tensor sparse_linear(torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> bias, double thr,
                            c10::optional<torch::Tensor> weight,
                            const c10::optional<at::TensorList>& group = c10::nullopt) {
  check2d(x, "x");
  check2d(wt, "weight_t");
  TORCH_CHECK(x.size(1) == wt.size(0), "sparsec sparse_linear: x has ", x.size(1), " features, weight_t has ",
              wt.size(0), " rows");
  TORCH_CHECK(x.scalar_type() == wt.scalar_type(), "sparsec sparse_linear: dtype mismatch");
  const int64_t B = x.size(0), K = x.size(1), N = wt.size(1);
  auto y = torch::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  const double limit = dense_density_limit(x.scalar_type(), B);
  if (limit < 1.0) {
    // when the rows' active channels together cover enough of the inputs, the library GEMM
    // beats streaming rows: take the dense path above the measured break-even union density
    auto xs = torch::empty_like(x);
    if (threshold_union(x, thr, xs) > static_cast<int64_t>(limit * K))
      return dense_linear(xs, wt, bias, weight, group);
  }
  if (x.scalar_type() == torch::kFloat) {
    sparse_linear_impl<float>(x.data_ptr<float>(), B, K, wt.data_ptr<float>(), N,
                              bias ? bias->data_ptr<float>() : nullptr, (float)thr, y.data_ptr<float>());
  } else if (x.scalar_type() == torch::kBFloat16) {
    using bf = c10::BFloat16;
    sparse_linear_impl<bf>(x.data_ptr<bf>(), B, K, wt.data_ptr<bf>(), N, bias ? bias->data_ptr<bf>() : nullptr,
                           (float)thr, y.data_ptr<bf>());
  } else {
    TORCH_CHECK(false, "sparsec sparse_linear: unsupported dtype ", x.scalar_type(), " (float32, bfloat16)");
  }
  return y;
}

torch::Tensor cats_mlp(torch::Tensor x, torch::Tensor a, torch::Tensor wup, c10::optional<torch::Tensor> bup,
                       torch::Tensor wdt, c10::optional<torch::Tensor> bdown, double thr) {
  check2d(x, "x");
  check2d(a, "activation");
  check2d(wup, "up_weight");
  check2d(wdt, "down_weight_t");
  const int64_t B = x.size(0), H = x.size(1), I = a.size(1);
  TORCH_CHECK(wup.size(0) == I && wup.size(1) == H && wdt.size(0) == I, "sparsec cats_mlp: shape mismatch");
  auto y = torch::empty({B, wdt.size(1)}, x.options());
  if (B == 0) return y;
  if (x.scalar_type() == torch::kFloat) {
    cats_impl<float>(x.data_ptr<float>(), a.data_ptr<float>(), B, H, I, wup.data_ptr<float>(),
                     bup ? bup->data_ptr<float>() : nullptr, wdt.data_ptr<float>(), wdt.size(1),
                     bdown ? bdown->data_ptr<float>() : nullptr, (float)thr, y.data_ptr<float>());
  } else if (x.scalar_type() == torch::kBFloat16) {
    using bf = c10::BFloat16;
    cats_impl<bf>(x.data_ptr<bf>(), a.data_ptr<bf>(), B, H, I, wup.data_ptr<bf>(), bup ? bup->data_ptr<bf>() : nullptr,
                  wdt.data_ptr<bf>(), wdt.size(1), bdown ? bdown->data_ptr<bf>() : nullptr, (float)thr,
                  y.data_ptr<bf>());
  } else {
    TORCH_CHECK(false, "sparsec cats_mlp: unsupported dtype ", x.scalar_type(), " (float32, bfloat16)");
  }
  return y;
}

// ---- the dispatcher-facing ops ------------------------------------------------------------
// Registered as the CPU kernels of sparsec::sparse_linear / sparsec::sparse_cats_mlp (schemas
// defined in kernels/activation.py), so a call from Inductor's generated code goes straight
// from the dispatcher to C++: a Python custom-op body cost 40-110 us per call here, more than
// the GEMV itself on SmolLM2's small linears. Inputs the kernels don't cover (other dtypes,
// more than MAX_ROWS tokens: prefill) take the reference: a dense GEMM on the thresholded input.

constexpr int64_t MAX_ROWS = 16;

inline at::Tensor threshold_ref(const at::Tensor& x, double thr) { return sparsec_threshold_ref(x, thr); }

bool kernel_ok(const at::Tensor& x, std::initializer_list<const at::Tensor*> ws, int64_t rows) {
  if (!(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16)) return false;
  if (rows <= 0 || rows > MAX_ROWS || !x.device().is_cpu()) return false;
  for (auto* w : ws)
    if (w && (w->scalar_type() != x.scalar_type() || !w->device().is_cpu())) return false;
  return true;
}

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t n) {
  auto s = x.sizes().vec();
  s.back() = n;
  return s;
}

at::Tensor sparse_linear_op(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                            double thr, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& residual, const c10::optional<at::TensorList>& group) {
  const int64_t K = x.size(-1), rows = K ? x.numel() / K : 0;
  TORCH_CHECK(wt.dim() == 2 && wt.size(0) == K, "sparsec::sparse_linear: weight_t must be [", K, ", out], got ",
              wt.sizes());
  sparsec_check_vector(bias, wt.size(1), "sparse_linear", "bias");
  TORCH_CHECK(!std::isnan(thr), "sparsec::sparse_linear: the threshold is NaN");
  if (!kernel_ok(x, {&wt, bias ? &*bias : nullptr}, rows))  // prefill: GEMM, on the original layout if given
    return sparsec_add_residual(dense_linear(threshold_ref(x, thr), wt, bias, weight, group), residual,
                                "sparse_linear");
  auto y = sparse_linear(x.reshape({rows, K}).contiguous(), wt.contiguous(),
                         bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt, thr, weight, group);
  return sparsec_add_residual(y.view(out_sizes(x, wt.size(1))), residual, "sparse_linear");
}

at::Tensor activation(const at::Tensor& g, c10::string_view act) {
  if (act == "silu") return at::silu(g);
  if (act == "gelu") return at::gelu(g);
  if (act == "gelu_tanh") return at::gelu(g, "tanh");
  if (act == "relu") return at::relu(g);
  TORCH_CHECK_VALUE(false, "sparsec::sparse_cats_mlp: unknown activation '", act, "'; known: gelu, gelu_tanh, relu, silu");
}

// The CATS gate, x W_gate^T + b. One bf16 token: a row-dot loop (fp32 accumulation, one
// rounding to bf16, as the library's), because oneDNN has no AMX path for a bf16 GEMV and
// re-lays the weight out per call: on SmolLM2's 1536x576 gate F.linear took 214 us warm and
// 1.46 ms cold, the kernels' row loop 76 us and 0.37 ms. Anything else: the library GEMM.
at::Tensor gate_linear(const at::Tensor& x, const at::Tensor& gw, const c10::optional<at::Tensor>& gb) {
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  const bool row_loop = rows == 1 && x.scalar_type() == at::kBFloat16 && gw.scalar_type() == at::kBFloat16 &&
                        gw.dim() == 2 && gw.size(1) == H && gw.is_contiguous() && x.device().is_cpu() &&
                        gw.device().is_cpu() &&
                        (!gb || (gb->scalar_type() == at::kBFloat16 && gb->is_contiguous() && gb->dim() == 1 &&
                                 gb->numel() == gw.size(0)));
  if (!row_loop) return at::linear(x, gw, gb);
  const int64_t I = gw.size(0);
  const auto xc = x.reshape({H}).contiguous();
  const auto* xp = xc.data_ptr<c10::BFloat16>();
  std::vector<float> xf(static_cast<size_t>(H));
  for (int64_t k = 0; k < H; ++k) xf[k] = static_cast<float>(xp[k]);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = I;
  auto g = at::empty(sizes, x.options());
  auto* gp = g.data_ptr<c10::BFloat16>();
  const auto* w = gw.data_ptr<c10::BFloat16>();
  const c10::BFloat16* b = gb ? gb->data_ptr<c10::BFloat16>() : nullptr;
  at::parallel_for(0, I, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      gp[j] = static_cast<c10::BFloat16>(dot(w + j * H, xf.data(), H) + (b ? static_cast<float>(b[j]) : 0.f));
  });
  return g;
}

at::Tensor sparse_cats_mlp_op(const at::Tensor& x, const at::Tensor& gw, const c10::optional<at::Tensor>& gb,
                              const at::Tensor& uw, const c10::optional<at::Tensor>& ub, const at::Tensor& dwt,
                              const c10::optional<at::Tensor>& db, double thr, c10::string_view act,
                              const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& dw) {
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  TORCH_CHECK(gw.dim() == 2 && uw.dim() == 2 && dwt.dim() == 2 && gw.size(1) == H && uw.size(1) == H &&
                  uw.size(0) == gw.size(0) && dwt.size(0) == gw.size(0),
              "sparsec::sparse_cats_mlp: gate ", gw.sizes(), ", up ", uw.sizes(), " and down_t ", dwt.sizes(),
              " do not fit ", H, " input features");
  sparsec_check_vector(gb, gw.size(0), "sparse_cats_mlp", "gate_bias");
  sparsec_check_vector(ub, uw.size(0), "sparse_cats_mlp", "up_bias");
  sparsec_check_vector(db, dwt.size(1), "sparse_cats_mlp", "down_bias");
  TORCH_CHECK(!std::isnan(thr), "sparsec::sparse_cats_mlp: the threshold is NaN");
  // the dense paths multiply by the original [hidden, inter] down weight when the graph passes
  // it: oneDNN's bf16 GEMM on the transposed copy took 1.7-2x as long (4096x11008, 4-16 rows)
  const at::Tensor down = dw ? *dw : dwt.t();
  auto a = activation(gate_linear(x, gw, gb), act);  // the gate is dense: CATS decides from it
  if (!kernel_ok(x, {&gw, &uw, &dwt, gb ? &*gb : nullptr, ub ? &*ub : nullptr, db ? &*db : nullptr}, rows))
    return sparsec_add_residual(at::linear(threshold_ref(a, thr) * at::linear(x, uw, ub), down, db), residual,
                                "sparse_cats_mlp");
  const int64_t I = a.size(-1);
  auto a2 = a.reshape({rows, I}).contiguous();
  const double limit = dense_density_limit(x.scalar_type(), rows);
  if (limit < 1.0) {
    // as in sparse_linear: when the rows' active channels together cover enough of the
    // intermediate size, the library GEMMs beat reading rows (bf16 with AMX, batch 4,
    // 4096 -> 11008 -> 4096, every channel active: 45.2 ms for the kernel, 38.9 for dense)
    auto as = at::empty_like(a2);
    if (threshold_union(a2, thr, as) > static_cast<int64_t>(limit * I))
      return sparsec_add_residual(at::linear(as.view(a.sizes()) * at::linear(x, uw, ub), down, db), residual,
                                  "sparse_cats_mlp");
  }
  auto c = [](const c10::optional<at::Tensor>& t) {
    return t ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
  };
  auto y = cats_mlp(x.reshape({rows, H}).contiguous(), a2, uw.contiguous(),
                    c(ub), dwt.contiguous(), c(db), thr);
  return sparsec_add_residual(y.view(out_sizes(x, dwt.size(1))), residual, "sparse_cats_mlp");
}

void register_ops() {
  // once per process, for the build kernels/cpu.py chose for this machine
  static torch::Library* lib = [] {
    auto* l = new torch::Library(torch::Library::IMPL, "sparsec", c10::DispatchKey::CPU, __FILE__, __LINE__);
    l->impl("sparse_linear", TORCH_FN(sparse_linear_op));
    l->impl("sparse_cats_mlp", TORCH_FN(sparse_cats_mlp_op));
    l->impl("nm_linear", TORCH_FN(sparsec_nm_linear_op));
    return l;
  }();
  (void)lib;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "sparse_linear",
      [](torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> bias, double thr,
         c10::optional<torch::Tensor> weight) { return sparse_linear(x, wt, bias, thr, weight); },
      "y = s_t(x) Wt + b on 2-D inputs, reading only active rows of Wt", py::arg("x"), py::arg("weight_t"),
      py::arg("bias"), py::arg("threshold"), py::arg("weight") = py::none());
  m.def("cats_mlp", &cats_mlp, "CATS MLP on 2-D inputs, reading only active rows of Wup and of Wdown^T");
  m.def(
      "sparse_linear_op",
      [](const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias, double thr,
         const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& residual,
         const c10::optional<std::vector<at::Tensor>>& group) {
        return group ? sparse_linear_op(x, wt, bias, thr, weight, residual, at::TensorList(*group))
                     : sparse_linear_op(x, wt, bias, thr, weight, residual, c10::nullopt);
      },
      "sparsec::sparse_linear's CPU kernel (any shape, with fallbacks)", py::arg("x"), py::arg("weight_t"),
      py::arg("bias"), py::arg("threshold"), py::arg("weight") = py::none(), py::arg("residual") = py::none(),
      py::arg("group_weights") = py::none());
  m.def("sparse_cats_mlp_op", &sparse_cats_mlp_op, "sparsec::sparse_cats_mlp's CPU kernel");
  m.def("register_ops", &register_ops, "register the ops above as the CPU kernels of the sparsec ops");
  m.def("nm_linear", &sparsec_nm_linear, "N:M compressed linear on 2-D inputs (<= 16 rows)");
  m.def("nm_linear_op", &sparsec_nm_linear_op, "sparsec::nm_linear's CPU kernel");
  m.def("nm_dense_copies", &sparsec_nm_dense_copies, "how many N:M dense copies are held",
        py::arg("drop_dead") = false);
  m.def("nm_drop_dense_copy", &sparsec_nm_drop_dense_copy, "drop the dense copy of the values at this TensorImpl");
  m.def("nm_unpack", &sparsec_nm_unpack, "dense weight from values + packed positions");
  m.def("isa", &isa_name, "the instruction set this build was compiled for");
}
