// The depthwise causal convolution over time, on CPU (see causal_conv.py), in the
// activations' own layout (B, S, C): no transpose to PyTorch's (B, C, S) and no padded
// copy. Output t of channel c reads the window's positions t + H - (K - 1) + j, j < K,
// with weight w[c, j]; the window's first H positions are history (a decoding cache's
// last inputs), and positions before the window read zero. One row of C channels is a
// contiguous vector, so every loop over c vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

// w (C, K) -> (K, C): a tap's weights for a whole row, contiguous.
template <typename T>
std::vector<T> taps_by_row(const T* w, int64_t C, int64_t K) {
  std::vector<T> taps(K * C);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < K; ++j) taps[j * C + c] = w[c * K + j];
  }
  return taps;
}

template <typename T>
void forward(const T* __restrict__ x, const T* w, T* __restrict__ y, int64_t B, int64_t S,
             int64_t C, int64_t K, int64_t H) {
  const int64_t length = S - H;
  const std::vector<T> taps = taps_by_row(w, C, K);
  at::parallel_for(0, B * length, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / length, t = row % length;
      T* __restrict__ out = y + row * C;
      std::fill(out, out + C, T(0));
      for (int64_t j = 0; j < K; ++j) {
        const int64_t s = t + H - (K - 1) + j;
        if (s < 0) continue;
        const T* __restrict__ in = x + (b * S + s) * C;
        const T* __restrict__ tap = taps.data() + j * C;
        for (int64_t c = 0; c < C; ++c) out[c] += tap[c] * in[c];
      }
    }
  });
}

// d_x[s] = sum_j w_j d_y[s - H + (K - 1) - j] over the outputs that read position s;
// d_w[c, j] = sum over (b, t) of d_y[b, t, c] x[b, t + H - (K - 1) + j, c]. The window's
// rows are split in up to PARTS parts of at least PART_ROWS rows, each summing its own d_w,
// added in part order: as many whatever the thread count, so that d_w is the same bits on
// any number of threads.
constexpr int64_t PARTS = 32, PART_ROWS = 32;
template <typename T>
void backward(const T* __restrict__ d_y, const T* __restrict__ x, const T* w,
              T* __restrict__ d_x, T* d_w, int64_t B, int64_t S, int64_t C, int64_t K,
              int64_t H) {
  const int64_t length = S - H, rows = B * S;
  const std::vector<T> taps = taps_by_row(w, C, K);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>((rows + PART_ROWS - 1) / PART_ROWS, PARTS));
  const int64_t per_part = (rows + parts - 1) / parts;
  std::vector<T> partial(parts * K * C, T(0));
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t part = first; part < last; ++part) {
      T* __restrict__ sums = partial.data() + part * K * C;
      for (int64_t row = part * per_part; row < std::min(rows, (part + 1) * per_part); ++row) {
        const int64_t b = row / S, s = row % S;
        T* __restrict__ out = d_x + row * C;
        const T* __restrict__ in = x + row * C;
        std::fill(out, out + C, T(0));
        for (int64_t j = 0; j < K; ++j) {
          const int64_t t = s - H + (K - 1) - j;  // the output that reads s through tap j
          if (t < 0 || t >= length) continue;
          const T* __restrict__ grad = d_y + (b * length + t) * C;
          const T* __restrict__ tap = taps.data() + j * C;
          T* __restrict__ tap_sum = sums + j * C;
          for (int64_t c = 0; c < C; ++c) {
            out[c] += tap[c] * grad[c];
            tap_sum[c] += grad[c] * in[c];
          }
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < K; ++j) {
      T total(0);
      for (int64_t part = 0; part < parts; ++part) total += partial[(part * K + j) * C + c];
      d_w[c * K + j] = total;
    }
  }
}

void check(const at::Tensor& x, const at::Tensor& weight, int64_t history) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x must be a contiguous (B, S, C) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(0) == x.size(2),
              "weight must be a contiguous (C, K) tensor, C = x.size(2)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x differ in dtype");
  TORCH_CHECK(history >= 0 && history <= x.size(1), "history must be in 0..S");
}

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& weight, int64_t history) {
  check(x, weight, history);
  at::Tensor y = at::empty({x.size(0), x.size(1) - history, x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_forward", [&] {
    forward<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                      y.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2),
                      weight.size(1), history);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> conv_backward(const at::Tensor& d_y, const at::Tensor& x,
                                                 const at::Tensor& weight, int64_t history) {
  check(x, weight, history);
  TORCH_CHECK(d_y.is_contiguous() && d_y.scalar_type() == x.scalar_type() &&
                  d_y.sizes() == at::IntArrayRef({x.size(0), x.size(1) - history, x.size(2)}),
              "d_y must be contiguous, of x's dtype, (B, S - history, C)");
  at::Tensor d_x = at::empty_like(x), d_w = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_backward", [&] {
    backward<scalar_t>(d_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                       weight.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(),
                       d_w.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2),
                       weight.size(1), history);
  });
  return {d_x, d_w};
}

}  // namespace

TORCH_LIBRARY(moa_causal_conv, m) {
  m.def("forward(Tensor x, Tensor weight, int history) -> Tensor");
  m.def("backward(Tensor d_y, Tensor x, Tensor weight, int history) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moa_causal_conv, CPU, m) {
  m.impl("forward", &conv_forward);
  m.impl("backward", &conv_backward);
}
