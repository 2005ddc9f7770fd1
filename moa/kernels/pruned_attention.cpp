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
#include <vector>

namespace {

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

// A (rows, n) matrix over the first rows * n elements of buffer.
at::Tensor matrix(const at::Tensor& buffer, int64_t rows, int64_t n) {
  return buffer.narrow(0, 0, rows * n).view({rows, n});
}

template <typename T>
void forward(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
             const at::Tensor& bc, const at::Tensor& positions, const at::Tensor& k,
             const at::Tensor& v, const at::Tensor& bias, const at::Tensor& scale,
             int64_t block_rows, at::Tensor& out, at::Tensor& lse) {
  const Shapes s(q, kc, k, block_rows);
  at::parallel_for(0, s.B * s.Hq * s.blocks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads too
    at::Tensor buffer = at::empty({s.rows * std::max<int64_t>(s.W, 1)}, q.options());
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
      at::Tensor scores = matrix(buffer, rows, n);
      if (n > 0) {
        at::mm_out(scores, q[b][h].narrow(0, first, rows), kc[b][hk].narrow(0, 0, n).t());
      }
      T* score = buffer.data_ptr<T>();
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
      at::Tensor out_rows = out[b][h].narrow(0, first, rows);
      if (n > 0) {
        at::mm_out(out_rows, scores, vc[b][hk].narrow(0, 0, n));
      } else {
        out_rows.zero_();
      }
      for (int64_t r = 0; r < rows; ++r) {  // the own key's weighted value, then / total
        const T* vi = v.data_ptr<T>() + ((b * s.Hkv + hk) * s.S + s.offset + first + r) * s.E;
        T* out_row = out_rows.data_ptr<T>() + r * s.E;
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
    at::Tensor probs = at::empty({s.rows * width}, q.options());
    at::Tensor grads = at::empty({s.rows * width}, q.options());
    at::Tensor dkc = at::zeros({gate_only ? 0 : width, s.E}, q.options());
    at::Tensor dvc = at::zeros({gate_only ? 0 : width, s.E}, q.options());
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
      const at::Tensor keys = kc[b][hk], values = vc[b][hk];
      dkc.zero_();
      dvc.zero_();
      std::fill(gate.begin(), gate.end(), T(0));
      std::fill(bias_grad.begin(), bias_grad.end(), T(0));
      for (int64_t h = hk * s.group; h < (hk + 1) * s.group; ++h) {
        const at::Tensor q_h = q[b][h], d_out_h = d_out[b][h];
        const T c = scale.data_ptr<T>()[h];
        T scale_grad(0);
        for (int64_t first = 0; first < s.T; first += s.rows) {
          const int64_t rows = std::min(s.rows, s.T - first);
          const int64_t n = seen(pos, s.W, s.offset + first + rows - 1);
          at::Tensor q_rows = q_h.narrow(0, first, rows);
          at::Tensor d_out_rows = d_out_h.narrow(0, first, rows);
          at::Tensor p = matrix(probs, rows, n), ds = matrix(grads, rows, n);
          if (n > 0) {
            at::mm_out(p, q_rows, keys.narrow(0, 0, n).t());
            at::mm_out(ds, d_out_rows, values.narrow(0, 0, n).t());
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = first + r, row_index = (b * s.Hq + h) * s.T + i;
            const T* qi = q.data_ptr<T>() + row_index * s.E;
            const T* d_oi = d_out.data_ptr<T>() + row_index * s.E;
            const T delta = dot(d_oi, out.data_ptr<T>() + row_index * s.E, s.E);
            const T row_lse = lse.data_ptr<T>()[row_index];
            const int64_t m = seen(pos, n, s.offset + i);
            T* p_row = probs.data_ptr<T>() + r * n;
            T* ds_row = grads.data_ptr<T>() + r * n;
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
          dvc.narrow(0, 0, n).addmm_(p.t(), d_out_rows);
          dkc.narrow(0, 0, n).addmm_(ds.t(), q_rows);
          dq[b][h].narrow(0, first, rows).addmm_(ds, keys.narrow(0, 0, n));
        }
        if (!gate_only) d_scale.data_ptr<T>()[b * s.Hq + h] = scale_grad;
      }
      T* gate_out = d_gate.data_ptr<T>() + unit * s.S;
      for (int64_t j = 0; j < s.W && pos[j] < s.S; ++j) {
        gate_out[pos[j]] += gate[j];
        if (gate_only) continue;
        d_own_bias[pos[j]] += bias_grad[j];
        axpy(T(1), dkc.data_ptr<T>() + j * s.E, dk_own + pos[j] * s.E, s.E);
        axpy(T(1), dvc.data_ptr<T>() + j * s.E, dv_own + pos[j] * s.E, s.E);
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

TORCH_LIBRARY(moa_pruned, m) {
  m.def("forward(Tensor q, Tensor kc, Tensor vc, Tensor bc, Tensor positions, Tensor k, "
        "Tensor v, Tensor bias, Tensor scale, int block_rows) -> (Tensor, Tensor)");
  m.def("backward(Tensor d_out, Tensor q, Tensor kc, Tensor vc, Tensor bc, Tensor positions, "
        "Tensor k, Tensor v, Tensor bias, Tensor scale, Tensor out, Tensor lse, "
        "bool gate_only, int block_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moa_pruned, CPU, m) {
  m.impl("forward", &pruned_forward);
  m.impl("backward", &pruned_backward);
}
