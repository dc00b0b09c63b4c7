// R-Sparse CPU kernel for sparsec (compiled into the same extension as the other families by
// kernels/cpu.py; registered as the CPU kernel of sparsec::rsparse_linear_t by register_ops).
//
//   rsparse_linear_t(x[B,K], Wt[K,N], bias?, scale[K] fp32, v[K,R], us[R,N], t, weight?, residual?)
//       m[b, k] = !(|x[b, k]| * scale[k] <= t)                       (NaN: active)
//       y[b, :] = bias + sum_{k: m} x[b, k] Wt[k, :] + sum_j z[b, j] us[j, :],
//       z[b, :] = sum_{k: !m} x[b, k] v[k, :]                          (fp32)
//
// Every term is "add coefficient x row" over a set of contiguous rows, the activation
// kernels' primitive (kernels/csrc/sparsec_common.h): the active rows of Wt through
// accumulate_rows (tiles, prefetch, the batch paths), the inactive rows of v and all rows of us
// through axpy_rows on fp32 accumulators. A token reads k N + (K - k) R + R N weights.
//
// Rounding: z stays fp32. For bf16 the sparse term is rounded to bf16 once (accumulate_rows
// writes the op's dtype) before the low-rank term is added in fp32 and rounded again: at most
// one extra bf16 rounding of the output, inside the tests' bf16 budget.

#include <torch/extension.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "sparsec_common.h"

using namespace sparsec::cpu;

namespace {

// acc[0:n] += sum_i c[i] * rows[i][0:n], ROWS rows per pass over acc (zero rows pad the last)
template <typename T>
void add_rows(float* acc, int64_t n, const std::vector<const T*>& rows, const std::vector<float>& c) {
  static const std::vector<T> zero_row(SPARSEC_ACC_FLOATS, T(0));
  const int64_t cnt = static_cast<int64_t>(rows.size());
  for (int64_t i = 0; i < cnt; i += ROWS) {
    const T* w[ROWS];
    const T* nx[ROWS];
    float cc[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      w[r] = (i + r < cnt) ? rows[i + r] : zero_row.data();
      nx[r] = (i + ROWS + r < cnt) ? rows[i + ROWS + r] : zero_row.data();
      cc[r] = (i + r < cnt) ? c[i + r] : 0.f;
    }
    axpy_rows(acc, n, w, cc, nx);
  }
}

template <typename T>
void rsparse_impl(const T* x, int64_t B, int64_t K, const T* wt, int64_t N, const T* bias, const float* scale,
                  float thr, const T* v, const T* us, int64_t R, T* y) {
  std::vector<int64_t> rows;
  std::vector<float> coef;
  active_rows_scaled(x, B, K, scale, thr, rows, coef);
  accumulate_rows(wt, N, rows, coef, B, bias, y);  // y = bias + the sparse term
  if (R == 0) return;
  // The rows of v are short (R floats): the whole low-rank term is per batch row, no tiling
  // beyond SPARSEC_ACC_FLOATS columns of us at a time.
  std::vector<float> z(static_cast<size_t>(R));
  std::vector<const T*> vr;
  std::vector<float> vc;
  std::vector<const T*> ur(static_cast<size_t>(R));
  vr.reserve(K);
  vc.reserve(K);
  std::vector<float> acc(static_cast<size_t>(std::min<int64_t>(N, SPARSEC_ACC_FLOATS)));
  for (int64_t b = 0; b < B; ++b) {
    const T* xb = x + b * K;
    vr.clear();
    vc.clear();
    for (int64_t k = 0; k < K; ++k) {
      const float xv = to_f(xb[k]);
      if (xv != 0.f && !active_scaled(xv, scale[k], thr)) {  // inactive and nonzero: the complement
        vr.push_back(v + k * R);
        vc.push_back(xv);
      }
    }
    for (int64_t r0 = 0; r0 < R; r0 += SPARSEC_ACC_FLOATS) {
      const int64_t n = std::min<int64_t>(SPARSEC_ACC_FLOATS, R - r0);
      std::fill(z.begin() + r0, z.begin() + r0 + n, 0.f);
      if (r0 == 0) {
        add_rows(z.data(), n, vr, vc);
      } else {
        std::vector<const T*> shifted(vr.size());
        for (size_t i = 0; i < vr.size(); ++i) shifted[i] = vr[i] + r0;
        add_rows(z.data() + r0, n, shifted, vc);
      }
    }
    for (int64_t n0 = 0; n0 < N; n0 += SPARSEC_ACC_FLOATS) {
      const int64_t n = std::min<int64_t>(SPARSEC_ACC_FLOATS, N - n0);
      T* yb = y + b * N + n0;
      for (int64_t j = 0; j < n; ++j) acc[j] = to_f(yb[j]);
      for (int64_t j = 0; j < R; ++j) ur[j] = us + j * N + n0;
      add_rows(acc.data(), n, ur, z);
      for (int64_t j = 0; j < n; ++j) yb[j] = static_cast<T>(acc[j]);
    }
  }
}

}  // namespace

// sparsec::rsparse_linear_t's CPU kernel. Rows beyond 16, other dtypes or devices: the dense
// path (the masked input through one GEMM on the original layout, the low-rank term through
// two thin GEMMs), as the Python op does.
at::Tensor sparsec_rsparse_linear_op(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& scale, const at::Tensor& v, const at::Tensor& us, double thr,
                                     const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& residual) {
  const int64_t K = x.size(-1), rows = K ? x.numel() / K : 0;
  TORCH_CHECK_VALUE(wt.dim() == 2 && wt.size(0) == K, "sparsec::rsparse_linear: weight_t must be [", K,
                    ", out], got ", wt.sizes());
  const int64_t N = wt.size(1);
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == K, "sparsec::rsparse_linear: scale has shape ",
                    scale.sizes(), ", not (", K, ",)");
  TORCH_CHECK_VALUE(v.dim() == 2 && v.size(0) == K, "sparsec::rsparse_linear: v has shape ", v.sizes(), ", not (",
                    K, ", rank)");
  const int64_t R = v.size(1);
  TORCH_CHECK_VALUE(us.dim() == 2 && us.size(0) == R && us.size(1) == N, "sparsec::rsparse_linear: us has shape ",
                    us.sizes(), ", not (", R, ", ", N, ")");
  sparsec_check_vector(bias, N, "rsparse_linear", "bias");
  TORCH_CHECK_VALUE(!std::isnan(thr), "sparsec::rsparse_linear: the threshold is NaN");
  const auto dt = x.scalar_type();
  const bool kernel = rows > 0 && rows <= 16 && (dt == at::kFloat || dt == at::kBFloat16) && x.device().is_cpu() &&
                      wt.scalar_type() == dt && v.scalar_type() == dt && us.scalar_type() == dt &&
                      (!bias || bias->scalar_type() == dt);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  if (!sizes.empty()) sizes.back() = N;
  if (!kernel) {
    const auto score = x.abs().to(dt == at::kDouble ? at::kDouble : at::kFloat) * scale;
    const auto m = score.le(thr).logical_not();
    const auto zero = at::zeros({}, x.options());
    const auto xs = at::where(m, x, zero), xc = at::where(m, zero, x);
    auto y = weight ? at::linear(xs, *weight, bias) : at::matmul(xs, wt);
    if (!weight && bias) y = y + *bias;
    if (R) y = y + at::matmul(at::matmul(xc, v), us);
    return sparsec_add_residual(y, residual, "rsparse_linear_t");
  }
  const auto x2 = x.reshape({rows, K}).contiguous();
  const auto wtc = wt.contiguous(), vc = v.contiguous(), usc = us.contiguous();
  const auto sc = scale.to(at::kFloat).contiguous();
  const auto bc = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  auto y = at::empty({rows, N}, x.options());
  if (dt == at::kFloat) {
    rsparse_impl<float>(x2.data_ptr<float>(), rows, K, wtc.data_ptr<float>(), N, bc ? bc->data_ptr<float>() : nullptr,
                        sc.data_ptr<float>(), static_cast<float>(thr), vc.data_ptr<float>(), usc.data_ptr<float>(), R,
                        y.data_ptr<float>());
  } else {
    using bf = c10::BFloat16;
    rsparse_impl<bf>(x2.data_ptr<bf>(), rows, K, wtc.data_ptr<bf>(), N, bc ? bc->data_ptr<bf>() : nullptr,
                     sc.data_ptr<float>(), static_cast<float>(thr), vc.data_ptr<bf>(), usc.data_ptr<bf>(), R,
                     y.data_ptr<bf>());
  }
  return sparsec_add_residual(y.view(sizes), residual, "rsparse_linear_t");
}
