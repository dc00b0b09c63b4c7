// N:M weight-sparse linear for sparsec (compiled into the same extension as
// activation_sparse.cpp by kernels/cpu.py).
//
//   nm_linear(x[B,K], values[O, K/M*N], positions[O, P] uint8, bias?, n, m, t)
//       y[b, o] = bias[o] + sum_i values[o, i] * s_t(x)[b, (i / n) * m + pos(o, i)]
//
// Format (kernels/nm.py packs it): each output row keeps n of every m consecutive input
// weights; ``values`` holds the kept weights in group order, ``positions`` their index inside
// the group with BITS = 1, 2, 4 or 8 bits per value (the smallest power of two >= log2 m),
// little-endian inside each byte. A token reads only the compressed bytes: values plus BITS
// per value, about (n/m)(1 + BITS/(8*sizeof)) of the dense weight.
//
// The AVX-512 path (BITS == 2, n dividing 16: 2:4, 1:4, 4:4...) takes 16 kept values at a
// time: one 32-bit load of positions, lane indices base + pos, a gather of x per batch row,
// one FMA. Other formats use the portable loop. ``t < 0`` means no activation threshold.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

// the ISA macros (SPARSEC_AVX512), to_f, load16m, the shared checks and the residual epilogue
#include "sparsec_common.h"

using namespace sparsec::cpu;

namespace {

inline int bits_for(int64_t m) {
  int b = 1;
  while ((int64_t(1) << b) < m) b *= 2;
  return b;
}

// 2:4 with 2-bit positions: a byte holds four positions = two groups; its 8-lane keep mask
struct Lut24 {
  uint8_t t[256];
  Lut24() {
    for (int b = 0; b < 256; ++b)
      t[b] = static_cast<uint8_t>((1 << (b & 3)) | (1 << ((b >> 2) & 3)) |
                                  (((1 << ((b >> 4) & 3)) | (1 << ((b >> 6) & 3))) << 4));
  }
};
const Lut24 kLut24;  // shared by the 2:4 kernel and the unpack


#if defined(SPARSEC_AVX512)
// One output row for BB (1-4) batch rows: returns the kept index where the vector part stopped.
// 16 dense input lanes = 16/m groups = cnt kept values: load the cnt values, spread them to
// their lanes with one VEXPANDPS (mask from the positions), FMA with 16 inputs. No gathers:
// vpgatherdd reached only 0.56x of F.linear here (microcoded on this CPU). BB is a template
// argument so the accumulators live in registers (a runtime-sized array of them went through
// the stack: 0.94x); two accumulator sets break the FMA dependency chain.
template <int BB, typename T>
inline int64_t nm_row(const T* v, const uint8_t* p, const float* xf, int64_t K, int64_t n, int64_t m, int bits,
                      uint32_t mask, const uint8_t* lut, float* acc) {
  const int cnt = static_cast<int>(16 / m * n);
  const __mmask16 lmask = static_cast<__mmask16>((1u << cnt) - 1u);
  auto keep_mask = [&](int64_t i) -> __mmask16 {
    if (lut) return static_cast<__mmask16>(lut[p[i >> 2]] | (static_cast<uint32_t>(lut[p[(i >> 2) + 1]]) << 8));
    uint32_t mk = 0;
    for (int j = 0; j < cnt; ++j) {
      const int64_t q = i + j;
      mk |= 1u << ((j / n) * m + ((p[(q * bits) >> 3] >> ((q * bits) & 7)) & mask));
    }
    return static_cast<__mmask16>(mk);
  };
  __m512 a0[BB], a1[BB];
  for (int b = 0; b < BB; ++b) a0[b] = a1[b] = _mm512_setzero_ps();
  int64_t i = 0, k0 = 0;
  for (; k0 + 32 <= K; k0 += 32, i += 2 * cnt) {
    const __m512 w0 = _mm512_maskz_expand_ps(keep_mask(i), load16m(v + i, lmask));
    const __m512 w1 = _mm512_maskz_expand_ps(keep_mask(i + cnt), load16m(v + i + cnt, lmask));
    for (int b = 0; b < BB; ++b) {
      a0[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xf + b * K + k0), a0[b]);
      a1[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xf + b * K + k0 + 16), a1[b]);
    }
  }
  if (k0 + 16 <= K) {
    const __m512 w0 = _mm512_maskz_expand_ps(keep_mask(i), load16m(v + i, lmask));
    for (int b = 0; b < BB; ++b) a0[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xf + b * K + k0), a0[b]);
    i += cnt;
  }
  for (int b = 0; b < BB; ++b) acc[b] += _mm512_reduce_add_ps(_mm512_add_ps(a0[b], a1[b]));
  return i;
}
#endif

// 2:4 fast path: 32 dense inputs = 8 groups = 16 kept values = one 32-bit word of positions.
// Lane j's input index is (j / 2) * 4 + pos_j; one VPERMT2PS picks those 16 inputs out of the
// 32, then one full-width FMA with the 16 values. (The expand path above does half the work
// per instruction: measured 0.98x of F.linear fp32.)
//
// R output rows at once share the input loads and keep R value streams in flight: at batch 1
// fp32 (one stream per call before) R = 4 took cold 4096x4096 / 11008x4096 / 4096x11008 from
// 1.65-1.70x / 1.35-1.39x / 1.55-1.62x of F.linear to 1.82-1.93x / 1.50-1.54x / 1.64-1.71x
// (three interleaved runs; R = 2 and R = 8 in between). R * BB * 2 accumulators stay <= 8.
#if defined(SPARSEC_AVX512)
#ifndef NM_PREFETCH
#define NM_PREFETCH 256  // values ahead on each stream; 512 (one stream) and 1024 into L2 measured no better
#endif
template <int R, int BB, typename T>
inline int64_t nm24_rows(const T* const* v, const uint8_t* const* p, const float* xf, int64_t K, float* const* acc) {
  const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i three = _mm512_set1_epi32(3);
  const __m512i base = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  __m512 a0[R][BB], a1[R][BB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BB; ++b) a0[r][b] = a1[r][b] = _mm512_setzero_ps();
  int64_t i = 0, k0 = 0;
  for (; k0 + 64 <= K; k0 += 64, i += 32) {
    for (int r = 0; r < R; ++r) {
      uint64_t w;
      std::memcpy(&w, p[r] + (i >> 2), 8);
      const __m512i i0 = _mm512_add_epi32(
          base, _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(w))), shifts), three));
      const __m512i i1 = _mm512_add_epi32(
          base, _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(w >> 32))), shifts), three));
      _mm_prefetch(reinterpret_cast<const char*>(v[r] + i + NM_PREFETCH), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v[r] + i + NM_PREFETCH + 16), _MM_HINT_T0);
      const __m512 v0 = load16m(v[r] + i, 0xFFFF), v1 = load16m(v[r] + i + 16, 0xFFFF);
      for (int b = 0; b < BB; ++b) {
        const float* x = xf + b * K + k0;
        a0[r][b] = _mm512_fmadd_ps(v0, _mm512_permutex2var_ps(_mm512_loadu_ps(x), i0, _mm512_loadu_ps(x + 16)), a0[r][b]);
        a1[r][b] = _mm512_fmadd_ps(v1, _mm512_permutex2var_ps(_mm512_loadu_ps(x + 32), i1, _mm512_loadu_ps(x + 48)), a1[r][b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BB; ++b) acc[r][b] += _mm512_reduce_add_ps(_mm512_add_ps(a0[r][b], a1[r][b]));
  return i;
}
#endif

// The kept values from ``i`` on of one output row, scalar (any n:m; the vector paths' tails).
template <typename T>
inline void nm_tail(const T* v, const uint8_t* p, int64_t i, int64_t kept, int64_t n, int64_t m, int bits,
                    uint32_t mask, const float* xf, int64_t B, int64_t K, float* acc) {
  for (; i < kept; ++i) {
    const int64_t byte = (i * bits) >> 3, shift = (i * bits) & 7;
    const int64_t k = (i / n) * m + ((p[byte] >> shift) & mask);
    const float w = to_f(v[i]);
    for (int64_t b = 0; b < B; ++b) acc[b] += w * xf[b * K + k];
  }
}

template <typename T>
void nm_impl(const float* xf, int64_t B, int64_t K, const T* vals, const uint8_t* pos, int64_t O, int64_t kept,
             int64_t pbytes, int64_t n, int64_t m, const T* bias, T* y) {
  const int bits = bits_for(m);
  const uint32_t mask = (1u << bits) - 1u;
  const uint8_t* lut = (n == 2 && m == 4) ? kLut24.t : nullptr;
  (void)lut;
  at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) {
    int64_t o = o0;
#if defined(SPARSEC_AVX512)
    // 2:4: 4 rows at once at batch 1, 2 at batch 2, else one row per 4 batch rows
    if (n == 2 && m == 4 && B <= 2) {
      const int R = B == 1 ? 4 : 2;
      for (; o + R <= o1; o += R) {
        const T* v[4];
        const uint8_t* p[4];
        float acc[4][2] = {};
        float* ap[4];
        for (int r = 0; r < R; ++r) {
          v[r] = vals + (o + r) * kept;
          p[r] = pos + (o + r) * pbytes;
          ap[r] = acc[r];
        }
        const int64_t i = B == 1 ? nm24_rows<4, 1>(v, p, xf, K, ap) : nm24_rows<2, 2>(v, p, xf, K, ap);
        for (int r = 0; r < R; ++r) {
          nm_tail(v[r], p[r], i, kept, n, m, bits, mask, xf, B, K, acc[r]);
          for (int64_t b = 0; b < B; ++b)
            y[b * O + o + r] = static_cast<T>(acc[r][b] + (bias ? to_f(bias[o + r]) : 0.f));
        }
      }
    }
#endif
    for (; o < o1; ++o) {
      const T* v = vals + o * kept;
      const uint8_t* p = pos + o * pbytes;
      float acc[16];
      for (int64_t b = 0; b < B; ++b) acc[b] = 0.f;
      int64_t i = 0;
#if defined(SPARSEC_AVX512)
      if (n == 2 && m == 4) {
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
          const int64_t bb = std::min<int64_t>(4, B - b0);
          const float* xb = xf + b0 * K;
          float* ap[1] = {acc + b0};
          switch (bb) {
            case 1: i = nm24_rows<1, 1>(&v, &p, xb, K, ap); break;
            case 2: i = nm24_rows<1, 2>(&v, &p, xb, K, ap); break;
            case 3: i = nm24_rows<1, 3>(&v, &p, xb, K, ap); break;
            default: i = nm24_rows<1, 4>(&v, &p, xb, K, ap); break;
          }
        }
      } else if (16 % m == 0) {
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
          const int64_t bb = std::min<int64_t>(4, B - b0);
          const float* xb = xf + b0 * K;
          switch (bb) {
            case 1: i = nm_row<1>(v, p, xb, K, n, m, bits, mask, lut, acc + b0); break;
            case 2: i = nm_row<2>(v, p, xb, K, n, m, bits, mask, lut, acc + b0); break;
            case 3: i = nm_row<3>(v, p, xb, K, n, m, bits, mask, lut, acc + b0); break;
            default: i = nm_row<4>(v, p, xb, K, n, m, bits, mask, lut, acc + b0); break;
          }
        }
      }
#endif
      nm_tail(v, p, i, kept, n, m, bits, mask, xf, B, K, acc);
      for (int64_t b = 0; b < B; ++b) y[b * O + o] = static_cast<T>(acc[b] + (bias ? to_f(bias[o]) : 0.f));
    }
  });
}

}  // namespace

// Exposed to activation_sparse.cpp's module (one extension, one registration point).
namespace {
// One pass over the (small) input: an fp32 copy with the threshold applied, into a reused
// per-thread buffer. Returns false if any input is NaN/inf. (Five ATen ops did this before:
// ~20 us per call, a fifth of a small SmolLM2 GEMV.)
template <typename T>
bool prepare_x(const T* x, int64_t count, double thr, float* out) {
  bool finite = true;
  const float t = static_cast<float>(thr);
  const bool th = thr >= 0;
  for (int64_t i = 0; i < count; ++i) {
    const float v = to_f(x[i]);
    finite &= std::isfinite(v);
    out[i] = (th && std::fabs(v) <= t) ? 0.f : v;
  }
  return finite;
}
}  // namespace

at::Tensor sparsec_nm_unpack(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m,
                             int64_t in_features);

// Rows of the dense weight for one GEMM, unpacked into a per-thread buffer kept between
// calls: a fresh 64 MB tensor per call spent most of its time in page faults (unpack of a
// 4096x4096 fp32 weight 42 ms into new memory). nm_reference asks for ~1 MiB blocks, so the
// buffer stays about that size.
at::Tensor unpack_scratch(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m,
                          int64_t in_features, int64_t row0, int64_t nrows);

namespace {
// the C++ unpack handles it (else ATen ops on the tensors' device)
bool unpack_on_cpu(const at::Tensor& values, const at::Tensor& positions) {
  return values.device().is_cpu() && positions.device().is_cpu() && positions.scalar_type() == at::kByte;
}

at::Tensor nm_reference(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions,
                        const c10::optional<at::Tensor>& bias, int64_t n, int64_t m, double thr) {
  auto xs = sparsec_threshold_ref(x, thr);
  const int64_t K = x.size(-1), O = values.size(0);
  const bool cpu = x.device().is_cpu() && unpack_on_cpu(values, positions);
  // Blocks of output rows whose weight (~1 MiB) is unpacked into L2 and multiplied at once:
  // unpacking the whole weight first wrote and re-read it through DRAM. 4096x4096 at 128
  // tokens, 1 thread: fp32 71.5 ms whole / 62.6 ms in blocks (dense GEMM alone 51.5 ms),
  // bf16 20.5 / 19.1 ms (oneDNN AMX GEMM 13.2 ms). ATen's scatter before: 380 ms for bf16.
  // Not within 5% of dense: the cached dense copy below is (the op's dense_copy flag).
  const int64_t blk = std::max<int64_t>(32, (int64_t(1) << 20) / std::max<int64_t>(1, K * values.element_size()));
  if (!cpu || blk >= O || K == 0) return at::linear(xs, unpack_scratch(values, positions, n, m, K, 0, O), bias);
  auto x2 = xs.reshape({-1, K});
  auto y = at::empty({x2.size(0), O}, x.options());
  for (int64_t o0 = 0; o0 < O; o0 += blk) {
    const int64_t len = std::min(blk, O - o0);
    auto w = unpack_scratch(values, positions, n, m, K, o0, len);
    auto part = bias ? at::addmm(bias->narrow(0, o0, len), x2, w.t()) : at::mm(x2, w.t());
    y.narrow(1, o0, len).copy_(part);
  }
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  return y.view(sizes);
}
}  // namespace

at::Tensor sparsec_nm_linear(const at::Tensor& x_, const at::Tensor& values, const at::Tensor& positions,
                             const c10::optional<at::Tensor>& bias, int64_t n, int64_t m, double thr) {
  TORCH_CHECK(x_.dim() == 2 && x_.device().is_cpu(), "sparsec nm_linear: x must be a 2-D CPU tensor");
  TORCH_CHECK(x_.size(0) <= 16, "sparsec nm_linear: at most 16 rows per call, got ", x_.size(0));
  TORCH_CHECK(positions.scalar_type() == at::kByte, "sparsec nm_linear: positions must be uint8");
  TORCH_CHECK(values.scalar_type() == x_.scalar_type(), "sparsec nm_linear: values dtype must match x");
  const int64_t B = x_.size(0), K = x_.size(1), O = values.size(0), kept = values.size(1);
  TORCH_CHECK(K % m == 0 && kept == K / m * n, "sparsec nm_linear: ", n, ":", m, " values of width ", kept,
              " do not fit ", K, " inputs");
  auto x = x_.contiguous();
  thread_local std::vector<float> xbuf;
  if (xbuf.size() < static_cast<size_t>(B * K)) xbuf.resize(static_cast<size_t>(B * K));
  bool finite;
  if (x.scalar_type() == at::kFloat) {
    finite = prepare_x(x.data_ptr<float>(), B * K, thr, xbuf.data());
  } else if (x.scalar_type() == at::kBFloat16) {
    finite = prepare_x(x.data_ptr<c10::BFloat16>(), B * K, thr, xbuf.data());
  } else {
    TORCH_CHECK(false, "sparsec nm_linear: unsupported dtype ", x.scalar_type(), " (float32, bfloat16)");
  }
  // NaN/inf inputs: the masked-dense reference multiplies them by the pruned zeros too (NaN
  // everywhere); the kernel never sees pruned weights, so it would hide them
  if (!finite) return nm_reference(x, values, positions, bias, n, m, thr);
  const float* xf = xbuf.data();
  auto y = torch::empty({B, O}, x.options());
  auto vals = values.contiguous();
  auto pos = positions.contiguous();
  if (x.scalar_type() == at::kFloat) {
    at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
    nm_impl<float>(xf, B, K, vals.data_ptr<float>(), pos.data_ptr<uint8_t>(), O, kept, pos.size(1), n, m,
                   bias ? bc.data_ptr<float>() : nullptr, y.data_ptr<float>());
  } else {
    using bf = c10::BFloat16;
    at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
    nm_impl<bf>(xf, B, K, vals.data_ptr<bf>(), pos.data_ptr<uint8_t>(), O, kept, pos.size(1), n, m,
                bias ? bc.data_ptr<bf>() : nullptr, y.data_ptr<bf>());
  }
  return y;
}

// Dense weight from the compressed format: the path for prefill-sized inputs and other
// dtypes, and the kernels' reference. One pass per row: zero it, drop each kept value at
// its position (ATen's scatter did this in 380 ms for a 4096x4096 bf16 weight, far more
// than the GEMM it feeds; this loop runs at memory speed). Other devices: ATen ops.
namespace {
template <typename T>
void unpack_rows(const T* v, const uint8_t* p, int64_t O, int64_t kept, int64_t pbytes, int64_t n, int64_t m,
                 int64_t K, T* w) {
  const int bits = bits_for(m);
  const uint32_t mask = (1u << bits) - 1u;
  at::parallel_for(0, O, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      T* row = w + o * K;
      const T* vr = v + o * kept;
      const uint8_t* pr = p + o * pbytes;
      int64_t done = 0;  // dense columns written by the vector path
#if defined(SPARSEC_AVX512)
      if (n == 2 && m == 4 && (sizeof(T) == 4 || std::is_same<T, c10::BFloat16>::value)) {
        // 16 columns = 4 groups = 8 kept values = 2 bytes of positions: one expanding load
        for (; done + 16 <= K; done += 16) {
          const int64_t i = done / 2;
          const __mmask16 keep =
              static_cast<__mmask16>(kLut24.t[pr[i >> 2]] | (static_cast<uint32_t>(kLut24.t[pr[(i >> 2) + 1]]) << 8));
          if constexpr (sizeof(T) == 4) {
            _mm512_storeu_ps(reinterpret_cast<float*>(row + done),
                             _mm512_maskz_expandloadu_ps(keep, reinterpret_cast<const float*>(vr + i)));
          } else {  // bf16 through 32-bit lanes: widen, expand, narrow (exact)
            const __m512i wide = _mm512_cvtepu16_epi32(
                _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + i))));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + done),
                                _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(keep, wide)));
          }
        }
      }
#endif
      if (done == K) continue;
      std::memset(static_cast<void*>(row + done), 0, sizeof(T) * (K - done));
      // group by group: a division per value (i / n) cost more than the whole copy
      for (int64_t i = done / m * n, base = done; i < kept; base += m)
        for (int64_t j = 0; j < n; ++j, ++i) {
          const int64_t bit = i * bits;
          row[base + ((pr[bit >> 3] >> (bit & 7)) & mask)] = vr[i];
        }
    }
  });
}
}  // namespace

namespace {
void check_packed(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m, int64_t in_features) {
  const int64_t O = values.size(0), kept = values.size(1);
  TORCH_CHECK(kept * m == in_features * n, "sparsec nm_unpack: ", n, ":", m, " values of width ", kept,
              " do not fit ", in_features, " inputs");
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == O && positions.size(1) * 8 >= kept * bits_for(m),
              "sparsec nm_unpack: positions of shape ", positions.sizes(), " do not hold ", kept, " x ", bits_for(m),
              " bits");
}

// rows [row0, row0 + w.size(0)) of the dense weight into w (CPU, checked format)
void unpack_into(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m, int64_t row0,
                 at::Tensor& w) {
  auto vals = values.contiguous();
  auto pos = positions.contiguous();
  const int64_t kept = vals.size(1), pb = pos.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, vals.scalar_type(), "sparsec_nm_unpack", [&] {
    unpack_rows<scalar_t>(vals.data_ptr<scalar_t>() + row0 * kept, pos.data_ptr<uint8_t>() + row0 * pb, w.size(0),
                          kept, pb, n, m, w.size(1), w.data_ptr<scalar_t>());
  });
}
}  // namespace

at::Tensor sparsec_nm_unpack(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m,
                             int64_t in_features) {
  check_packed(values, positions, n, m, in_features);
  const int bits = bits_for(m);
  const int64_t O = values.size(0), kept = values.size(1);
  if (unpack_on_cpu(values, positions)) {
    auto w = at::empty({O, in_features}, values.options());
    unpack_into(values, positions, n, m, 0, w);
    return w;
  }
  auto shifts = at::arange(0, 8, bits, positions.options().dtype(at::kInt));
  auto pv = positions.to(at::kInt).unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and((1 << bits) - 1);
  pv = pv.reshape({O, -1}).narrow(1, 0, kept).to(at::kLong);
  auto base = at::arange(kept, positions.options().dtype(at::kLong)).div(n, "floor").mul(m);
  auto w = at::zeros({O, in_features}, values.options());
  return w.scatter_(1, pv + base, values);
}

at::Tensor unpack_scratch(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m,
                          int64_t in_features, int64_t row0, int64_t nrows) {
  if (!unpack_on_cpu(values, positions))
    return sparsec_nm_unpack(values, positions, n, m, in_features).narrow(0, row0, nrows);
  check_packed(values, positions, n, m, in_features);
  thread_local at::Tensor scratch;
  const int64_t bytes = nrows * in_features * static_cast<int64_t>(values.element_size());
  if (!scratch.defined() || scratch.numel() < bytes) scratch = at::empty({bytes}, values.options().dtype(at::kByte));
  auto w = scratch.narrow(0, 0, bytes).view(values.scalar_type()).view({nrows, in_features});
  unpack_into(values, positions, n, m, row0, w);
  return w;
}

namespace {
// ---- the dense copy: where no N:M kernel wins on this CPU --------------------------------------
// The library GEMM on the masked dense weight beats both N:M paths here (1 thread, cold weights,
// python bench/kernels.py --nm [--dense-copy] --batches ...):
//  - more than 16 tokens: unpacking blocks for the GEMM costs 0.82-1.0x of dense in fp32 and
//    0.5-0.75x in bf16 (AMX GEMMs are fast enough that the unpack dominates);
//  - bf16 on an AMX CPU from 5 tokens: oneDNN's AMX GEMM is flat from 2 tokens on, the
//    kernel grows with tokens (gathers per token): 2:4 at 4 tokens 1.02-1.95x, at 6 0.72-1.41x,
//    at 16 0.48-0.63x of dense.
// fp32 keeps the kernel through 16 tokens (1.5-2.6x at 8-16).
bool dense_copy_wins(at::ScalarType dtype, int64_t rows) {
  if (rows > 16) return true;
  if (dtype == at::kBFloat16) return rows >= 5 && sparsec_cpu_has_amx_bf16();
  return dtype != at::kFloat;  // fp16/fp64: no kernel, the copy saves the unpack per call
}

// values tensor -> its masked dense weight, made on the first call that needs it, remade when
// values or positions change. Held beside a weak reference to the values: the nm pass drops a
// copy when its values are freed (nm_drop_dense_copy), and inserting a copy drops those of
// dead values. Keyed by identity: the compiled graph passes the same constants on every call.
struct DenseCopy {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> values;
  uint32_t values_version, positions_version;
  const void* positions_ptr;
  at::Tensor dense;
};
std::mutex dense_copies_mu;
std::unordered_map<const c10::TensorImpl*, DenseCopy> dense_copies;

at::Tensor dense_copy_of(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m, int64_t K) {
  const auto* key = values.unsafeGetTensorImpl();
  // inference tensors keep no version counter (reading it throws): as in kernels/cpu.py's
  // version_of, they count as never changing
  auto version = [](const at::Tensor& t) { return t.is_inference() ? uint32_t(-1) : t._version(); };
  const uint32_t vv = version(values), pv = version(positions);
  {
    std::lock_guard<std::mutex> g(dense_copies_mu);
    auto it = dense_copies.find(key);
    if (it != dense_copies.end()) {
      auto alive = it->second.values.lock();
      if (alive.get() == key && it->second.values_version == vv && it->second.positions_version == pv &&
          it->second.positions_ptr == positions.data_ptr())
        return it->second.dense;
    }
  }
  auto dense = sparsec_nm_unpack(values, positions, n, m, K);  // outside the lock: it takes milliseconds
  std::lock_guard<std::mutex> g(dense_copies_mu);
  for (auto it = dense_copies.begin(); it != dense_copies.end();)  // drop the copies of dead weights
    it = it->second.values.expired() ? dense_copies.erase(it) : std::next(it);
  dense_copies.insert_or_assign(
      key, DenseCopy{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(values.getIntrusivePtr()),
                     vv, pv, positions.data_ptr(), dense});
  return dense;
}
}  // namespace

// Drop the dense copy of the values tensor at this TensorImpl address: called by the nm pass as
// its compressed weights are freed (a Python finalizer runs before the weak reference above
// expires, so it names the tensor). Returns whether there was one.
bool sparsec_nm_drop_dense_copy(int64_t impl) {
  std::lock_guard<std::mutex> g(dense_copies_mu);
  return dense_copies.erase(reinterpret_cast<const c10::TensorImpl*>(impl)) > 0;
}

// how many dense copies are held, after dropping those of dead weights if asked (inserting a
// copy drops them too)
int64_t sparsec_nm_dense_copies(bool drop_dead) {
  std::lock_guard<std::mutex> g(dense_copies_mu);
  for (auto it = dense_copies.begin(); drop_dead && it != dense_copies.end();)
    it = it->second.values.expired() ? dense_copies.erase(it) : std::next(it);
  return static_cast<int64_t>(dense_copies.size());
}

at::Tensor sparsec_nm_linear_op(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions,
                                const c10::optional<at::Tensor>& bias, int64_t n, int64_t m, double thr,
                                bool dense_copy, const c10::optional<at::Tensor>& residual) {
  const int64_t K = x.size(-1), rows = K ? x.numel() / K : 0;
  TORCH_CHECK(n >= 1 && m > n && m <= 256, "sparsec::nm_linear: keep n of every m needs 1 <= n < m <= 256, got n=",
              n, ", m=", m);
  TORCH_CHECK(!std::isnan(thr), "sparsec::nm_linear: the threshold is NaN");
  TORCH_CHECK(values.dim() == 2 && values.size(1) * m == K * n, "sparsec::nm_linear: ", n, ":", m,
              " values of shape ", values.sizes(), " do not fit ", K, " input features");
  check_packed(values, positions, n, m, K);  // the kernels index positions by row: a short one is read past its end
  sparsec_check_vector(bias, values.size(0), "nm_linear", "bias");
  if (dense_copy && rows > 0 && x.device().is_cpu() && unpack_on_cpu(values, positions) &&
      values.scalar_type() == x.scalar_type() && dense_copy_wins(x.scalar_type(), rows)) {
    auto dense = dense_copy_of(values, positions, n, m, K);
    return sparsec_add_residual(at::linear(sparsec_threshold_ref(x, thr), dense, bias), residual, "nm_linear");
  }
  const bool ok = (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  values.scalar_type() == x.scalar_type() && (!bias || bias->scalar_type() == x.scalar_type()) &&
                  rows > 0 && rows <= 16 && x.device().is_cpu();
  if (!ok) return sparsec_add_residual(nm_reference(x, values, positions, bias, n, m, thr), residual, "nm_linear");
  auto y = sparsec_nm_linear(x.reshape({rows, K}), values, positions, bias, n, m, thr);
  auto sizes = x.sizes().vec();
  sizes.back() = values.size(0);
  return sparsec_add_residual(y.view(sizes), residual, "nm_linear");
}
