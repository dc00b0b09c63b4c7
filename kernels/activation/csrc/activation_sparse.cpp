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
//
// The active-row streaming itself (active_rows, accumulate_rows and its inner loops), the
// threshold compare, the loads and the shared checks live in kernels/csrc/sparsec_common.h, for
// every family that multiplies a sparse input by a transposed weight; this file holds the
// activation ops, their dense-path policy, and the extension's module and op registration.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "sparsec_common.h"

using namespace sparsec::cpu;

// nm_sparse.cpp (registered by this file's module: one extension, one registration point)
at::Tensor sparsec_nm_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions,
                             const c10::optional<at::Tensor>& bias, int64_t n, int64_t m, double thr);
at::Tensor sparsec_nm_linear_op(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions,
                                const c10::optional<at::Tensor>& bias, int64_t n, int64_t m, double thr,
                                bool dense_copy, const c10::optional<at::Tensor>& residual);
int64_t sparsec_nm_dense_copies(bool drop_dead);
bool sparsec_nm_drop_dense_copy(int64_t impl);
at::Tensor sparsec_nm_unpack(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m,
                             int64_t in_features);
// kernels/rsparse/csrc/rsparse_sparse.cpp
at::Tensor sparsec_rsparse_linear_op(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& scale, const at::Tensor& v, const at::Tensor& us, double thr,
                                     const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& residual);

namespace {

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
    l->impl("rsparse_linear_t", TORCH_FN(sparsec_rsparse_linear_op));
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
  m.def("rsparse_linear_op", &sparsec_rsparse_linear_op, "sparsec::rsparse_linear_t's CPU kernel");
  m.def("isa", &isa_name, "the instruction set this build was compiled for");

}
