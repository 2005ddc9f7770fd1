// Causal attention over the kept keys and each query's own key, on CPU (see
// pruned_attention.py). Query i of head h scores key j as q_i . k_j + c_h b_j: a dot
// product at scale 1 plus a per-key bias b (B, Hkv, S) times a per-query-head factor c
// (Hq,). Per (batch, key head) the kept keys are gathered in position order (kc, vc, and
// their biases bc), with their positions (ascending; padding past every query). Query i
// at position offset + i sees the gathered keys before its position, a prefix of them,
// and its own key k[offset + i], kept or not. Blocks of `block_rows` queries make one product each
// over the prefix their last query sees; a query's softmax stops at its own prefix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

// The ops' namespace: another one lets a second build load beside this one (a test
// builds the ATen-products fallback below under moa_pruned_aten).
#ifndef MOA_PRUNED_NAMESPACE
#define MOA_PRUNED_NAMESPACE moa_pruned
#endif
#define MOA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define MOA_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

// BLAS's gemm, where the process has one (libtorch_cpu exports MKL's on x86): weak, so
// that the kernel still loads without and falls back to ATen's products (always, when
// built with -DMOA_PRUNED_ATEN_PRODUCTS).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace {

// C (m, n) = op(A) op(B) + beta C over row-major storage (row strides lda, ldb, ldc),
// op(X) = X or, with trans_x, X stored transposed; beta is 0 or 1. BLAS on the raw
// pointers where it is linked: the kernels' blocks are small, and ATen's products
// would build a view and dispatch for each. BLAS is column-major, so it computes C^T =
// op(B)^T op(A)^T with the operands swapped.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int M = m, N = n, K = k, LDA = lda, LDB = ldb, LDC = ldc;
  const T one(1);
#ifndef MOA_PRUNED_ATEN_PRODUCTS
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&tb, &ta, &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&tb, &ta, &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
      return;
    }
  }
#endif
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto matrix = [&](const T* x, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    const at::Tensor stored = at::from_blob(const_cast<T*>(x), {trans ? cols : rows,
                                            trans ? rows : cols}, {ld, 1}, options);
    return trans ? stored.t() : stored;
  };
  at::Tensor result = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (beta == T(0)) {
    at::mm_out(result, matrix(a, m, k, lda, trans_a), matrix(b, k, n, ldb, trans_b));
  } else {
    result.addmm_(matrix(a, m, k, lda, trans_a), matrix(b, k, n, ldb, trans_b));
  }
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Gathered keys strictly before `position`: the prefix a query at `position` sees.
int64_t seen(const int64_t* positions, int64_t count, int64_t position) {
  return std::lower_bound(positions, positions + count, position) - positions;
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
    acc = at::vec::fmadd(Vec<T>::loadu(a + j), Vec<T>::loadu(b + j), acc);
  }
  T total = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, acc);
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

// y += a * x
template <typename T>
void axpy(T a, const T* x, T* y, int64_t n) {
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
    at::vec::fmadd(Vec<T>(a), Vec<T>::loadu(x + j), Vec<T>::loadu(y + j)).store(y + j);
  }
  for (; j < n; ++j) y[j] += a * x[j];
}

// x[j] += c * bias[j] for j < n; returns the largest of start and the new x[j].
template <typename T>
T add_bias_max(T* x, const T* bias, T c, int64_t n, T start) {
  Vec<T> acc(start);
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
    Vec<T> biased = at::vec::fmadd(Vec<T>(c), Vec<T>::loadu(bias + j), Vec<T>::loadu(x + j));
    biased.store(x + j);
    acc = at::vec::maximum(acc, biased);
  }
  T best = at::vec::vec_reduce_all<T>(
      [](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, acc);
  for (; j < n; ++j) best = std::max(best, x[j] += c * bias[j]);
  return best;
}

// x[j] = exp(x[j] - shift) for j < n; returns their sum.
template <typename T>
T exp_sum(T* x, int64_t n, T shift) {
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
    Vec<T> e = (Vec<T>::loadu(x + j) - Vec<T>(shift)).exp_u20();
    e.store(x + j);
    acc = acc + e;
  }
  T total = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; j < n; ++j) total += (x[j] = std::exp(x[j] - shift));
  return total;
}

// For j < n, p holding q.k and ds dO.v: p[j] = exp(min(p[j] + c bias[j] - lse, 0)) (the
// probability; for a pruned key, the one it would take if let in, capped at 1 as in the
// reference), ds[j] = p[j] * (ds[j] - delta) (the score's gradient), gate[j] += ds[j],
// bias_grad[j] += c ds[j]. Returns sum_j ds[j] bias[j] (this row's part of dc).
template <typename T>
T score_gradients(T* p, T* ds, const T* bias, T c, T* gate, T* bias_grad, int64_t n, T lse,
                  T delta) {
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
    const Vec<T> b = Vec<T>::loadu(bias + j);
    const Vec<T> score = at::vec::fmadd(Vec<T>(c), b, Vec<T>::loadu(p + j));
    Vec<T> prob = at::vec::minimum(score - Vec<T>(lse), Vec<T>(0)).exp_u20();
    Vec<T> grad = prob * (Vec<T>::loadu(ds + j) - Vec<T>(delta));
    prob.store(p + j);
    grad.store(ds + j);
    (Vec<T>::loadu(gate + j) + grad).store(gate + j);
    at::vec::fmadd(Vec<T>(c), grad, Vec<T>::loadu(bias_grad + j)).store(bias_grad + j);
    acc = at::vec::fmadd(grad, b, acc);
  }
  T total = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    p[j] = std::exp(std::min(p[j] + c * bias[j] - lse, T(0)));
    ds[j] = p[j] * (ds[j] - delta);
    gate[j] += ds[j];
    bias_grad[j] += c * ds[j];
    total += ds[j] * bias[j];
  }
  return total;
}

struct Shapes {
  int64_t B, Hq, Hkv, T, S, E, W, offset, group, rows, blocks;
  Shapes(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& k, int64_t rows)
      : B(q.size(0)), Hq(q.size(1)), Hkv(kc.size(1)), T(q.size(2)), S(k.size(2)),
        E(q.size(3)), W(kc.size(2)), offset(k.size(2) - q.size(2)),
        group(q.size(1) / kc.size(1)), rows(rows), blocks((q.size(2) + rows - 1) / rows) {}
};

template <typename T>
void forward(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
             const at::Tensor& bc, const at::Tensor& positions, const at::Tensor& k,
             const at::Tensor& v, const at::Tensor& bias, const at::Tensor& scale,
             int64_t block_rows, at::Tensor& out, at::Tensor& lse) {
  const Shapes s(q, kc, k, block_rows);
  at::parallel_for(0, s.B * s.Hq * s.blocks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads too
    std::vector<T> buffer(s.rows * std::max<int64_t>(s.W, 1));  // a block's scores
    std::vector<T> own(s.rows), inverse(s.rows);  // a row's own-key weight, 1 / its total
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t block = unit % s.blocks, b = unit / s.blocks / s.Hq;
      const int64_t h = unit / s.blocks % s.Hq, hk = h / s.group;
      const int64_t first = block * s.rows, rows = std::min(s.rows, s.T - first);
      const int64_t* pos = positions.data_ptr<int64_t>() + (b * s.Hkv + hk) * s.W;
      const T* kept_bias = bc.data_ptr<T>() + (b * s.Hkv + hk) * s.W;
      const T* own_bias = bias.data_ptr<T>() + (b * s.Hkv + hk) * s.S + s.offset;
      const T c = scale.data_ptr<T>()[h];
      const int64_t n = seen(pos, s.W, s.offset + first + rows - 1);
      const T* q_rows = q.data_ptr<T>() + ((b * s.Hq + h) * s.T + first) * s.E;
      const T* keys = kc.data_ptr<T>() + (b * s.Hkv + hk) * s.W * s.E;
      T* score = buffer.data();
      if (n > 0) gemm<T>(false, true, rows, n, s.E, q_rows, s.E, keys, s.E, T(0), score, n);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = first + r;
        const T* qi = q.data_ptr<T>() + ((b * s.Hq + h) * s.T + i) * s.E;
        const T* ki = k.data_ptr<T>() + ((b * s.Hkv + hk) * s.S + s.offset + i) * s.E;
        T* row = score + r * n;
        const int64_t m = seen(pos, n, s.offset + i);
        const T own_score = dot(qi, ki, s.E) + c * own_bias[i];
        const T shift = add_bias_max(row, kept_bias, c, m, own_score);
        own[r] = std::exp(own_score - shift);
        const T total = exp_sum(row, m, shift) + own[r];
        std::fill(row + m, row + n, T(0));
        inverse[r] = T(1) / total;
        lse.data_ptr<T>()[(b * s.Hq + h) * s.T + i] = shift + std::log(total);
      }
      T* out_rows = out.data_ptr<T>() + ((b * s.Hq + h) * s.T + first) * s.E;
      if (n > 0) {
        const T* values = vc.data_ptr<T>() + (b * s.Hkv + hk) * s.W * s.E;
        gemm<T>(false, false, rows, s.E, n, score, n, values, s.E, T(0), out_rows, s.E);
      } else {
        std::fill(out_rows, out_rows + rows * s.E, T(0));
      }
      for (int64_t r = 0; r < rows; ++r) {  // the own key's weighted value, then / total
        const T* vi = v.data_ptr<T>() + ((b * s.Hkv + hk) * s.S + s.offset + first + r) * s.E;
        T* out_row = out_rows + r * s.E;
        axpy(own[r], vi, out_row, s.E);
        for (int64_t e = 0; e < s.E; ++e) out_row[e] *= inverse[r];
      }
    }
  });
}

// Gradients of `forward` given its out and lse; d_scale per batch row (B, Hq). With
// gate_only, only d_gate: the keys of kc (then pruned ones let in) get the gradient of a
// multiplicative weight on their probability, own keys excluded; the others come back
// empty.
template <typename T>
void backward(const at::Tensor& d_out, const at::Tensor& q, const at::Tensor& kc,
              const at::Tensor& vc, const at::Tensor& bc, const at::Tensor& positions,
              const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
              const at::Tensor& scale, const at::Tensor& out, const at::Tensor& lse,
              bool gate_only, int64_t block_rows, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv, at::Tensor& d_gate, at::Tensor& d_bias, at::Tensor& d_scale) {
  const Shapes s(q, kc, k, block_rows);
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t width = std::max<int64_t>(s.W, 1);
    std::vector<T> probs(s.rows * width), grads(s.rows * width);  // a block's p and ds
    std::vector<T> dkc(gate_only ? 0 : width * s.E), dvc(gate_only ? 0 : width * s.E);
    std::vector<T> gate(width), bias_grad(width);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / s.Hkv, hk = unit % s.Hkv;
      const int64_t* pos = positions.data_ptr<int64_t>() + unit * s.W;
      const T* k_own = k.data_ptr<T>() + unit * s.S * s.E;
      const T* v_own = v.data_ptr<T>() + unit * s.S * s.E;
      T* dk_own = gate_only ? nullptr : dk.data_ptr<T>() + unit * s.S * s.E;
      T* dv_own = gate_only ? nullptr : dv.data_ptr<T>() + unit * s.S * s.E;
      const T* kept_bias = bc.data_ptr<T>() + unit * s.W;
      const T* own_bias = bias.data_ptr<T>() + unit * s.S;
      T* d_own_bias = gate_only ? nullptr : d_bias.data_ptr<T>() + unit * s.S;
      const T* keys = kc.data_ptr<T>() + unit * s.W * s.E;
      const T* values = vc.data_ptr<T>() + unit * s.W * s.E;
      std::fill(dkc.begin(), dkc.end(), T(0));
      std::fill(dvc.begin(), dvc.end(), T(0));
      std::fill(gate.begin(), gate.end(), T(0));
      std::fill(bias_grad.begin(), bias_grad.end(), T(0));
      for (int64_t h = hk * s.group; h < (hk + 1) * s.group; ++h) {
        const T c = scale.data_ptr<T>()[h];
        T scale_grad(0);
        for (int64_t first = 0; first < s.T; first += s.rows) {
          const int64_t rows = std::min(s.rows, s.T - first);
          const int64_t n = seen(pos, s.W, s.offset + first + rows - 1);
          const int64_t first_row = (b * s.Hq + h) * s.T + first;
          const T* q_rows = q.data_ptr<T>() + first_row * s.E;
          const T* d_out_rows = d_out.data_ptr<T>() + first_row * s.E;
          T* p = probs.data();
          T* ds = grads.data();
          if (n > 0) {
            gemm<T>(false, true, rows, n, s.E, q_rows, s.E, keys, s.E, T(0), p, n);
            gemm<T>(false, true, rows, n, s.E, d_out_rows, s.E, values, s.E, T(0), ds, n);
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = first + r, row_index = (b * s.Hq + h) * s.T + i;
            const T* qi = q.data_ptr<T>() + row_index * s.E;
            const T* d_oi = d_out.data_ptr<T>() + row_index * s.E;
            const T delta = dot(d_oi, out.data_ptr<T>() + row_index * s.E, s.E);
            const T row_lse = lse.data_ptr<T>()[row_index];
            const int64_t m = seen(pos, n, s.offset + i);
            T* p_row = p + r * n;
            T* ds_row = ds + r * n;
            scale_grad += score_gradients(p_row, ds_row, kept_bias, c, gate.data(),
                                          bias_grad.data(), m, row_lse, delta);
            if (gate_only) continue;  // the products below, which read the tails, are skipped
            std::fill(p_row + m, p_row + n, T(0));
            std::fill(ds_row + m, ds_row + n, T(0));
            const int64_t own = (s.offset + i) * s.E, own_key = s.offset + i;
            const T own_prob =
                std::exp(dot(qi, k_own + own, s.E) + c * own_bias[own_key] - row_lse);
            const T own_grad = own_prob * (dot(d_oi, v_own + own, s.E) - delta);
            d_own_bias[own_key] += c * own_grad;
            scale_grad += own_grad * own_bias[own_key];
            axpy(own_grad, k_own + own, dq.data_ptr<T>() + row_index * s.E, s.E);
            axpy(own_grad, qi, dk_own + own, s.E);
            axpy(own_prob, d_oi, dv_own + own, s.E);
          }
          if (gate_only || n == 0) continue;
          gemm<T>(true, false, n, s.E, rows, p, n, d_out_rows, s.E, T(1), dvc.data(), s.E);
          gemm<T>(true, false, n, s.E, rows, ds, n, q_rows, s.E, T(1), dkc.data(), s.E);
          gemm<T>(false, false, rows, s.E, n, ds, n, keys, s.E, T(1),
                  dq.data_ptr<T>() + first_row * s.E, s.E);
        }
        if (!gate_only) d_scale.data_ptr<T>()[b * s.Hq + h] = scale_grad;
      }
      T* gate_out = d_gate.data_ptr<T>() + unit * s.S;
      for (int64_t j = 0; j < s.W && pos[j] < s.S; ++j) {
        gate_out[pos[j]] += gate[j];
        if (gate_only) continue;
        d_own_bias[pos[j]] += bias_grad[j];
        axpy(T(1), dkc.data() + j * s.E, dk_own + pos[j] * s.E, s.E);
        axpy(T(1), dvc.data() + j * s.E, dv_own + pos[j] * s.E, s.E);
      }
    }
  });
}

void check(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
           const at::Tensor& bc, const at::Tensor& positions, const at::Tensor& k,
           const at::Tensor& v, const at::Tensor& bias, const at::Tensor& scale,
           int64_t block_rows) {
  for (const at::Tensor* x : {&q, &kc, &vc, &k, &v}) {
    TORCH_CHECK(x->dim() == 4 && x->is_contiguous() && x->scalar_type() == q.scalar_type() &&
                    x->size(3) == q.size(3),
                "pruned_attention: contiguous (B, H, L, E) heads of one dtype and E expected");
  }
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.sizes() == kc.sizes().slice(0, 3),
              "pruned_attention: positions (B, Hkv, W) int64 expected");
  TORCH_CHECK(bc.is_contiguous() && bc.scalar_type() == q.scalar_type() &&
                  bc.sizes() == kc.sizes().slice(0, 3) && bias.is_contiguous() &&
                  bias.scalar_type() == q.scalar_type() &&
                  bias.sizes() == k.sizes().slice(0, 3),
              "pruned_attention: key biases (B, Hkv, W) and (B, Hkv, S) like q expected");
  TORCH_CHECK(scale.dim() == 1 && scale.is_contiguous() && scale.size(0) == q.size(1) &&
                  scale.scalar_type() == q.scalar_type(),
              "pruned_attention: a bias scale (Hq,) like q expected");
  TORCH_CHECK(q.size(1) % kc.size(1) == 0 && k.size(2) >= q.size(2),
              "pruned_attention: query heads a multiple of key heads, at least T keys");
  TORCH_CHECK(block_rows > 0, "pruned_attention: block_rows must be positive");
}

std::tuple<at::Tensor, at::Tensor> pruned_forward(
    const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bc,
    const at::Tensor& positions, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& bias, const at::Tensor& scale, int64_t block_rows) {
  check(q, kc, vc, bc, positions, k, v, bias, scale, block_rows);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty(q.sizes().slice(0, 3), q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pruned_forward", [&] {
    forward<scalar_t>(q, kc, vc, bc, positions, k, v, bias, scale, block_rows, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pruned_backward(const at::Tensor& d_out, const at::Tensor& q, const at::Tensor& kc,
                const at::Tensor& vc, const at::Tensor& bc, const at::Tensor& positions,
                const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                const at::Tensor& scale, const at::Tensor& out, const at::Tensor& lse,
                bool gate_only, int64_t block_rows) {
  check(q, kc, vc, bc, positions, k, v, bias, scale, block_rows);
  TORCH_CHECK(d_out.sizes() == q.sizes() && d_out.is_contiguous() && out.is_contiguous(),
              "pruned_attention: d_out and out like q expected");
  // gate_only: only d_gate (the others empty tensors)
  const auto grad = [&](const at::Tensor& x, at::IntArrayRef sizes) {
    return gate_only ? at::empty({0}, x.options()) : at::zeros(sizes, x.options());
  };
  at::Tensor dq = grad(q, q.sizes()), dk = grad(k, k.sizes()), dv = grad(v, v.sizes());
  at::Tensor d_bias = grad(bias, bias.sizes()), d_scale = grad(q, q.sizes().slice(0, 2));
  at::Tensor d_gate = at::zeros(k.sizes().slice(0, 3), k.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pruned_backward", [&] {
    backward<scalar_t>(d_out, q, kc, vc, bc, positions, k, v, bias, scale, out, lse,
                       gate_only, block_rows, dq, dk, dv, d_gate, d_bias, d_scale);
  });
  return {dq, dk, dv, d_gate, d_bias, d_scale};
}

}  // namespace

MOA_LIBRARY(MOA_PRUNED_NAMESPACE, m) {
  m.def("forward(Tensor q, Tensor kc, Tensor vc, Tensor bc, Tensor positions, Tensor k, "
        "Tensor v, Tensor bias, Tensor scale, int block_rows) -> (Tensor, Tensor)");
  m.def("backward(Tensor d_out, Tensor q, Tensor kc, Tensor vc, Tensor bc, Tensor positions, "
        "Tensor k, Tensor v, Tensor bias, Tensor scale, Tensor out, Tensor lse, "
        "bool gate_only, int block_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

MOA_LIBRARY_IMPL(MOA_PRUNED_NAMESPACE, CPU, m) {
  m.impl("forward", &pruned_forward);
  m.impl("backward", &pruned_backward);
}
