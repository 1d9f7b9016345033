// CPU kernels of the batch-norm family: y = act(batch_norm(x) + residual), its
// eval form and its backward. The contract (shapes, dtypes, math) is in
// csrc/ops.cpp and csrc/bn_checks.h.
//
// Every pass walks the (N, C, L) index space as lines along the input's
// unit-stride dim: along L for NCHW (the channel is fixed on a line), along C
// for channels_last (the channel is the position on the line). Each tensor is
// addressed with its own strides, so channel slices, mixed layouts and stride-0
// gradients need no copy; the common case, where every tensor has unit stride
// along the lines, gets its own instantiation, whose line loops vectorize.
//
// Training forward reads the input twice (statistics, then normalize), the
// backward reads its inputs twice (reductions, then grad_input; with a ReLU
// and grad_residual wanted, the first pass writes grad_residual and the second
// reads it instead of grad_output and output); per-channel work in between is
// O(C). Along L, a thread takes blocks of channels through both passes, so that
// the second reads what the first left in its cache (by_channel_blocks).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <initializer_list>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include "bn_checks.h"
#include "bn_signatures.h"

namespace cnnkern {
namespace {

// ---- walking (N, C, L) as lines ---------------------------------------------

// Line strides known at compile time: Unit makes loads contiguous (vectorizable),
// Bcast is a per-channel array on an L line (one value, hoisted out of the loop).
using Unit = std::integral_constant<int64_t, 1>;
using Bcast = std::integral_constant<int64_t, 0>;

template <typename S>
S line_stride(int64_t s) {
  if constexpr (std::is_same_v<S, int64_t>) {
    return s;
  } else {
    TORCH_INTERNAL_ASSERT(s == S::value);
    return S{};
  }
}

// One line of a tensor: element k is p[k * stride].
template <typename T, typename S>
struct Line {
  T* p;
  S stride;
  T& operator[](int64_t k) const { return p[k * stride]; }
};

// A tensor (or a per-channel array) as lines (n, j), j < J.
template <typename T, typename S>
struct Lines {
  T* data;
  int64_t s_n, s_j;
  S stride;
  Line<T, S> line(int64_t n, int64_t j) const { return {data + n * s_n + j * s_j, stride}; }
};

// Lines are cut into segments of at most kSegment elements, the unit of parallel
// work: a few long lines (C = 1, large L) still spread over all threads.
constexpr int64_t kSegment = 4096;

// Lines run along the dim that loads contiguously: L for NCHW, C for
// channels_last and whenever L == 1; for other strides, the smaller one.
inline bool walk_along_c(const Strided3d& x) {
  if (x.L == 1 || x.C == 1) return x.L == 1;
  if (x.sL == 1 || x.sC == 1) return x.sC == 1;
  return x.sC < x.sL;
}

// Lines (n, j) for n < N, each `len` elements long: j = channel and len = L
// when walking along L, j = spatial index and len = C along C. A walk covers
// channels [c0, c0 + nc): all of them, or along L a block of them (channels()).
struct Walk {
  bool along_c;
  int64_t N, C, J, len, segs;
  int64_t M;       // values per channel: N * L
  int64_t c0, nc;  // the channels covered
  int64_t j0;      // first line index: c0 along L, 0 along C

  explicit Walk(const Strided3d& x)
      : along_c(walk_along_c(x)),
        N(x.N),
        C(x.C),
        J(along_c ? x.L : x.C),
        len(along_c ? x.C : x.L),
        segs((len + kSegment - 1) / kSegment),
        M(x.N * x.L),
        c0(0),
        nc(x.C),
        j0(0) {}

  // The same walk over channels [begin, end) (along L only: along C every line holds every channel).
  Walk channels(int64_t begin, int64_t end) const {
    TORCH_INTERNAL_ASSERT(!along_c && 0 <= begin && begin < end && end <= C);
    Walk part = *this;
    part.c0 = part.j0 = begin;
    part.nc = part.J = end - begin;
    return part;
  }

  int64_t items() const { return N * J * segs; }
  // Segments per parallel chunk: about GRAIN_SIZE elements, so small tensors stay on one thread.
  int64_t grain() const { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::min(len, kSegment)); }

  int64_t line_stride_of(const Strided3d& v) const { return along_c ? v.sC : v.sL; }

  // Calls f(n, j, k_begin, k_end) for the segments [begin, end) in order.
  template <typename F>
  void for_segments(int64_t begin, int64_t end, const F& f) const {
    int64_t seg = begin % segs, j = begin / segs % J, n = begin / segs / J;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k0 = seg * kSegment;
      f(n, j0 + j, k0, std::min(k0 + kSegment, len));
      if (++seg == segs) {
        seg = 0;
        if (++j == J) j = 0, ++n;
      }
    }
  }

  // `t` as lines; an undefined `t` (an absent optional) gives lines never read.
  template <typename T, typename S>
  Lines<T, S> lines(const at::Tensor& t) const {
    if (!t.defined()) return {nullptr, 0, 0, S{}};
    const Strided3d v = view3d(t, "tensor");
    T* data = t.data_ptr<std::remove_const_t<T>>();
    return along_c ? Lines<T, S>{data, v.sN, v.sL, line_stride<S>(v.sC)}
                   : Lines<T, S>{data, v.sN, v.sC, line_stride<S>(v.sL)};
  }

  // A (C,) array as lines: indexed by position along C, constant along L.
  template <typename S, typename T>
  Lines<T, S> per_channel(T* data) const {
    return along_c ? Lines<T, S>{data, 0, 0, line_stride<S>(1)} : Lines<T, S>{data, 0, 1, line_stride<S>(0)};
  }
};

// Calls f(TensorStride{}, ChannelStride{}): the line-stride types of the tensors
// (Unit when every defined one of `tensors` has unit stride along the lines,
// else a runtime stride) and of per-channel arrays (Unit along C, Bcast along L).
template <typename F>
void dispatch_strides(const Walk& w, std::initializer_list<const at::Tensor*> tensors, const F& f) {
  const bool unit = std::all_of(tensors.begin(), tensors.end(), [&](const at::Tensor* t) {
    return !t->defined() || w.line_stride_of(view3d(*t, "tensor")) == 1;
  });
  const auto with_channel_stride = [&](auto tensor_stride) {
    w.along_c ? f(tensor_stride, Unit{}) : f(tensor_stride, Bcast{});
  };
  unit ? with_channel_stride(Unit{}) : with_channel_stride(int64_t{});
}

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag made a
// compile-time one, so that line loops carry no per-element branch.
template <typename F>
void dispatch_bool(bool b, const F& f) {
  b ? f(std::true_type{}) : f(std::false_type{});
}

// ---- the two kinds of passes --------------------------------------------------

// The build targets baseline x86-64 (SSE2). The functions holding the line
// loops also get an AVX2 clone, picked at load time by GCC's function
// multiversioning: channels_last lines load three per-channel arrays per
// element and are compute-bound at SSE width. No AVX-512 clone: there GCC
// turns the ReLU select into zero-masking loads, which made the backward 1.5-2x
// slower than AVX2 on the project's AMD EPYC machines, and these memory-bound
// loops gain nothing from the wider vectors. The arithmetic is the same in
// every clone (no FMA contraction under -std=c++17, fixed summation order), so
// results do not depend on the machine. Clang does not multiversion templates.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define CNNKERN_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CNNKERN_VECTOR_CLONES
#endif

// Runs line_fn(n, j)(k) for every element of segments [begin, end).
template <typename LineFn>
CNNKERN_VECTOR_CLONES void apply_segments(const Walk& w, int64_t begin, int64_t end, const LineFn& line_fn) {
  w.for_segments(begin, end, [&](int64_t n, int64_t j, int64_t k0, int64_t k1) {
    const auto elem = line_fn(n, j);
#pragma omp simd
    for (int64_t k = k0; k < k1; ++k) elem(k);
  });
}

// Runs line_fn(n, j)(k) for every element (n, j, k), in parallel over segments.
template <typename LineFn>
void for_each_element(const Walk& w, const LineFn& line_fn) {
  at::parallel_for(0, w.items(), w.grain(),
                   [&](int64_t begin, int64_t end) { apply_segments(w, begin, end, line_fn); });
}

// Along L, the partial sums of a segment: kLanes per quantity, in independent
// vector registers, so that the adds pipeline instead of each waiting on the last.
constexpr int64_t kLanes = 16;

// Adds the sums of the pairs of segments [begin, end) of L lines to sums[j - c0]
// and sums[nc + j - c0]. The elements of a line are all channel j's.
template <typename acc_t, typename LineFn>
CNNKERN_VECTOR_CLONES void sum_segments_along_l(const Walk& w, int64_t begin, int64_t end, const LineFn& line_fn,
                                                double* sums) {
  w.for_segments(begin, end, [&](int64_t n, int64_t j, int64_t k0, int64_t k1) {
    const auto elem = line_fn(n, j);
    std::array<acc_t, kLanes> a{}, b{};
    int64_t k = k0;
    for (; k + kLanes <= k1; k += kLanes) {
#pragma omp simd
      for (int64_t v = 0; v < kLanes; ++v) {
        const std::pair<acc_t, acc_t> ab = elem(k + v);  // (a structured binding defeats GCC's if-conversion)
        a[v] += ab.first;
        b[v] += ab.second;
      }
    }
    for (int64_t v = 0; k + v < k1; ++v) {
      const std::pair<acc_t, acc_t> ab = elem(k + v);
      a[v] += ab.first;
      b[v] += ab.second;
    }
    sums[j - w.c0] += std::accumulate(a.begin(), a.end(), 0.0);
    sums[w.nc + j - w.c0] += std::accumulate(b.begin(), b.end(), 0.0);
  });
}

// Along C, per-channel partial sums hold at most this many lines before being
// folded into double.
constexpr int64_t kFoldLines = 256;

// Adds the sums of the pairs of segments [begin, end) of C lines to sums[c]
// and sums[C + c]. Element k of a line is channel k's (and the walk covers all C).
template <typename acc_t, typename LineFn>
CNNKERN_VECTOR_CLONES void sum_segments_along_c(const Walk& w, int64_t begin, int64_t end, const LineFn& line_fn,
                                                double* sums) {
  std::vector<acc_t> part(2 * w.C, 0);
  acc_t* a = part.data();
  acc_t* b = a + w.C;
  const auto fold = [&] {
    for (int64_t c = 0; c < 2 * w.C; ++c) sums[c] += std::exchange(part[c], 0);
  };
  int64_t lines = 0;
  w.for_segments(begin, end, [&](int64_t n, int64_t j, int64_t k0, int64_t k1) {
    const auto elem = line_fn(n, j);
#pragma omp simd
    for (int64_t k = k0; k < k1; ++k) {
      const std::pair<acc_t, acc_t> ab = elem(k);
      a[k] += ab.first;
      b[k] += ab.second;
    }
    if (++lines % kFoldLines == 0) fold();
  });
  fold();
}

// Per-channel sums of the pair (a, b) that line_fn(n, j)(k) yields per element,
// for the walk's channels c0 + i, i < nc: {sum a for each, then sum b for each}.
// Partial sums are acc_t (vector-wide, fast) over at most a segment or
// kFoldLines lines, folded into per-thread double sums (accurate whatever N * L),
// which are combined at the end.
// ChannelStride tells where the channel is: j on an L line, k on a C line.
template <typename acc_t, typename ChannelStride, typename LineFn>
std::vector<double> channel_sums(const Walk& w, const LineFn& line_fn) {
  const int64_t size = 2 * w.nc;
  const int nthreads = at::get_num_threads();
  std::vector<double> thread_sums(nthreads * size, 0.0);
  at::parallel_for(0, w.items(), w.grain(), [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid < nthreads);
    double* sums = thread_sums.data() + tid * size;
    if constexpr (std::is_same_v<ChannelStride, Bcast>) {
      sum_segments_along_l<acc_t>(w, begin, end, line_fn, sums);
    } else {
      sum_segments_along_c<acc_t>(w, begin, end, line_fn, sums);
    }
  });
  std::vector<double> total(size, 0.0);
  for (int t = 0; t < nthreads; ++t) {
    for (int64_t i = 0; i < size; ++i) total[i] += thread_sums[t * size + i];
  }
  return total;
}

// ---- channel blocks -------------------------------------------------------------

// Along L every line holds one channel, so a thread can take a block of channels
// through both passes of an op while the block's data is still in its L2: the
// second pass then reads cache, not memory (ATen's own schedule for NCHW). Used
// when every thread gets whole channels and one channel's first-pass data fits
// half an L2; otherwise each pass runs over the whole tensor cut into segments,
// which keeps every thread busy however few channels or long lines there are.
int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? int64_t(v) : int64_t(1) << 20;  // 1 MiB where the OS does not say
  }();
  return bytes;
}

// Calls f(part) for blocks of channels in parallel (each block's two passes on one
// thread), or f(w) once; bytes_per_channel: what one channel's first pass touches.
template <typename F>
void by_channel_blocks(const Walk& w, int64_t bytes_per_channel, const F& f) {
  const int64_t budget = l2_bytes() / 2, threads = at::get_num_threads();
  if (w.along_c || w.C < 2 * threads || bytes_per_channel > budget) return f(w);
  const int64_t block = std::clamp<int64_t>(budget / bytes_per_channel, 1, w.C / (2 * threads));
  at::parallel_for(0, w.C, block, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; c += block) f(w.channels(c, std::min(c + block, end)));
  });
}

// ---- per-channel parameters ---------------------------------------------------

// Parameters and running stats are input's dtype, or float32 for reduced-precision
// input (AMP); calls f(param_t{}).
template <typename scalar_t, typename F>
void dispatch_param_type(at::ScalarType param_dtype, const F& f) {
  if constexpr (sizeof(scalar_t) == 2) {
    if (param_dtype == at::kFloat) return f(float{});
  }
  f(scalar_t{});
}

// An optional (C,) parameter in acc_t, or `fill` where it is absent.
template <typename acc_t, typename param_t>
std::vector<acc_t> param_or(const at::Tensor& t, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (t.defined()) std::copy_n(t.data_ptr<param_t>(), C, out.begin());
  return out;
}

// y = act((x - mean) * scale + shift + residual), per channel. This form, not
// x * a + b, keeps the precision when |mean| >> std.
template <typename acc_t>
struct Affine {
  std::vector<acc_t> mean, scale, shift;
};

// ---- forward ------------------------------------------------------------------

// Per-channel sums of x - ref_c and (x - ref_c)^2 over the walk's channels, in
// double, in one read of the input ({first sums, then second sums}, as
// channel_sums). ref_c = x[0, c, 0]: shifted by a value of the channel, they are
// sums of deviations, so the variance does not cancel away when |mean| >> std
// (accurate while |ref_c - mean| is a few std).
template <typename scalar_t>
std::vector<double> shifted_sums(const Walk& w, const at::Tensor& input, const at::opmath_type<scalar_t>* ref) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<double> sums;
  dispatch_strides(w, {&input}, [&](auto ts, auto cs) {
    using TS = decltype(ts);
    using CS = decltype(cs);
    const auto X = w.lines<const scalar_t, TS>(input);
    const auto Ref = w.per_channel<CS>(ref);
    sums = channel_sums<acc_t, CS>(w, [&](int64_t n, int64_t j) {
      return [x = X.line(n, j), ref = Ref.line(n, j)](int64_t k) {
        const acc_t d = static_cast<acc_t>(x[k]) - ref[k];
        return std::pair<acc_t, acc_t>(d, d * d);
      };
    });
  });
  return sums;
}

// The normalize pass of both forwards: output = act((x - mean) * scale + shift + r).
template <typename scalar_t>
void normalize(const Walk& w, const at::Tensor& input, const at::Tensor& residual, bool relu,
               const Affine<at::opmath_type<scalar_t>>& affine, const at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  dispatch_bool(residual.defined(), [&](auto has_residual) {
    dispatch_bool(relu, [&](auto do_relu) {
      dispatch_strides(w, {&input, &residual, &output}, [&](auto ts, auto cs) {
        using TS = decltype(ts);
        using CS = decltype(cs);
        constexpr bool kResidual = decltype(has_residual)::value, kRelu = decltype(do_relu)::value;
        const auto X = w.lines<const scalar_t, TS>(input);
        const auto R = w.lines<const scalar_t, TS>(residual);
        const auto Y = w.lines<scalar_t, TS>(output);
        const auto Mean = w.per_channel<CS>(affine.mean.data());
        const auto Scale = w.per_channel<CS>(affine.scale.data());
        const auto Shift = w.per_channel<CS>(affine.shift.data());
        for_each_element(w, [&](int64_t n, int64_t j) {
          return [x = X.line(n, j), r = R.line(n, j), y = Y.line(n, j), mean = Mean.line(n, j),
                  scale = Scale.line(n, j), shift = Shift.line(n, j)](int64_t k) {
            acc_t v = (static_cast<acc_t>(x[k]) - mean[k]) * scale[k] + shift[k];
            if constexpr (kResidual) v += static_cast<acc_t>(r[k]);
            if constexpr (kRelu) v = std::max(v, acc_t(0));
            y[k] = static_cast<scalar_t>(v);
          };
        });
      });
    });
  });
}

template <typename scalar_t, typename param_t>
void bn_forward_train_kernel_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                  const at::Tensor& residual, const at::Tensor& running_mean,
                                  const at::Tensor& running_var, double momentum, double eps, bool relu,
                                  const at::Tensor& output, const at::Tensor& save_mean,
                                  const at::Tensor& save_invstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strided3d xv = view3d(input, "input");
  const Walk w(xv);
  const int64_t C = w.C;
  std::vector<acc_t> ref(C);
  for (int64_t c = 0; c < C; ++c) ref[c] = input.data_ptr<scalar_t>()[c * xv.sC];

  Affine<acc_t> affine{std::vector<acc_t>(C), param_or<acc_t, param_t>(weight, C, 1),
                       param_or<acc_t, param_t>(bias, C, 0)};
  acc_t* save_mean_p = save_mean.data_ptr<acc_t>();
  acc_t* save_invstd_p = save_invstd.data_ptr<acc_t>();
  param_t* rm = running_mean.defined() ? running_mean.data_ptr<param_t>() : nullptr;
  param_t* rv = running_var.defined() ? running_var.data_ptr<param_t>() : nullptr;
  // In acc_t, stored in param_t, as F.batch_norm; running_var takes the unbiased variance.
  const acc_t keep = static_cast<acc_t>(1 - momentum), take = static_cast<acc_t>(momentum);
  const double unbias = static_cast<double>(w.M) / (w.M - 1);

  by_channel_blocks(w, w.M * input.element_size(), [&](const Walk& part) {
    const std::vector<double> sums = shifted_sums<scalar_t>(part, input, ref.data());
    for (int64_t i = 0; i < part.nc; ++i) {
      const int64_t c = part.c0 + i;
      const double d = sums[i] / w.M;  // mean - ref_c
      const double var = std::max(sums[part.nc + i] / w.M - d * d, 0.0);
      save_mean_p[c] = static_cast<acc_t>(ref[c] + d);
      save_invstd_p[c] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
      affine.mean[c] = save_mean_p[c];
      affine.scale[c] *= save_invstd_p[c];
      if (rm) rm[c] = keep * static_cast<acc_t>(rm[c]) + take * save_mean_p[c];
      if (rv) rv[c] = keep * static_cast<acc_t>(rv[c]) + take * static_cast<acc_t>(var * unbias);
    }
    normalize<scalar_t>(part, input, residual, relu, affine, output);
  });
}

template <typename scalar_t, typename param_t>
void bn_forward_eval_kernel_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& residual, const at::Tensor& running_mean,
                                 const at::Tensor& running_var, double eps, bool relu, const at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const Walk w(view3d(input, "input"));
  const int64_t C = w.C;
  Affine<acc_t> affine{param_or<acc_t, param_t>(running_mean, C, 0), param_or<acc_t, param_t>(weight, C, 1),
                       param_or<acc_t, param_t>(bias, C, 0)};
  const param_t* rv = running_var.data_ptr<param_t>();
  for (int64_t c = 0; c < C; ++c)
    affine.scale[c] *= static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
  normalize<scalar_t>(w, input, residual, relu, affine, output);
}

// ---- backward -----------------------------------------------------------------

// The gradient reaching the batch norm: grad_output, zeroed where the ReLU was off.
template <bool kRelu, typename acc_t, typename G, typename Y>
acc_t relu_grad(const G& g, const Y& y, int64_t k) {
  const acc_t gk = static_cast<acc_t>(g[k]);  // loaded unconditionally: a select, not a branch
  if constexpr (kRelu) {
    return static_cast<acc_t>(y[k]) > acc_t(0) ? gk : acc_t(0);
  } else {
    return gk;
  }
}

// Per channel of the walk: {sum gz for each, then sum gz * (x - mean) for each}, in double.
// A defined grad_residual receives gz on the way (it is gz when relu): the
// elementwise pass then reads it instead of grad_output and output.
template <typename scalar_t>
std::vector<double> grad_sums(const Walk& w, const at::Tensor& grad_output, const at::Tensor& input,
                              const at::Tensor& output, const at::opmath_type<scalar_t>* mean, bool relu,
                              const at::Tensor& grad_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<double> sums;
  dispatch_bool(relu, [&](auto do_relu) {
    dispatch_bool(grad_residual.defined(), [&](auto want_residual) {
      dispatch_strides(w, {&grad_output, &input, &output, &grad_residual}, [&](auto ts, auto cs) {
        using TS = decltype(ts);
        using CS = decltype(cs);
        constexpr bool kRelu = decltype(do_relu)::value, kResidual = decltype(want_residual)::value;
        const auto G = w.lines<const scalar_t, TS>(grad_output);
        const auto X = w.lines<const scalar_t, TS>(input);
        const auto Y = w.lines<const scalar_t, TS>(output);
        const auto DR = w.lines<scalar_t, TS>(grad_residual);
        const auto Mean = w.per_channel<CS>(mean);
        sums = channel_sums<acc_t, CS>(w, [&](int64_t n, int64_t j) {
          return [g = G.line(n, j), x = X.line(n, j), y = Y.line(n, j), dr = DR.line(n, j),
                  mean = Mean.line(n, j)](int64_t k) {
            const acc_t gz = relu_grad<kRelu, acc_t>(g, y, k);
            if constexpr (kResidual) dr[k] = static_cast<scalar_t>(gz);
            return std::pair<acc_t, acc_t>(gz, gz * (static_cast<acc_t>(x[k]) - mean[k]));
          };
        });
      });
    });
  });
  return sums;
}

// Per-channel coefficients of grad_input = (gz - mean_gz - (x - mean) * proj) * scale;
// mean_gz and proj are 0 in eval mode, where the statistics are constants.
template <typename acc_t>
struct GradCoeffs {
  const acc_t* mean;
  std::vector<acc_t> mean_gz, proj, scale;
};

// The elementwise pass of the backward: grad_input and/or grad_residual (= gz).
template <typename scalar_t>
void grad_elementwise(const Walk& w, const at::Tensor& grad_output, const at::Tensor& input,
                      const at::Tensor& output, bool training, bool relu,
                      const GradCoeffs<at::opmath_type<scalar_t>>& coeffs, const at::Tensor& grad_input,
                      const at::Tensor& grad_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  // In eval mode grad_input = gz * scale: input is not read at all.
  const at::Tensor x_used = training && grad_input.defined() ? input : at::Tensor();
  dispatch_bool(relu, [&](auto do_relu) {
    dispatch_bool(training, [&](auto is_training) {
      dispatch_bool(grad_input.defined(), [&](auto want_input) {
        dispatch_bool(grad_residual.defined(), [&](auto want_residual) {
          dispatch_strides(w, {&grad_output, &x_used, &output, &grad_input, &grad_residual}, [&](auto ts, auto cs) {
            using TS = decltype(ts);
            using CS = decltype(cs);
            constexpr bool kRelu = decltype(do_relu)::value, kTraining = decltype(is_training)::value;
            constexpr bool kInput = decltype(want_input)::value, kResidual = decltype(want_residual)::value;
            const auto G = w.lines<const scalar_t, TS>(grad_output);
            const auto X = w.lines<const scalar_t, TS>(x_used);
            const auto Y = w.lines<const scalar_t, TS>(output);
            const auto DX = w.lines<scalar_t, TS>(grad_input);
            const auto DR = w.lines<scalar_t, TS>(grad_residual);
            const auto Mean = w.per_channel<CS>(coeffs.mean);
            const auto MeanGz = w.per_channel<CS>(coeffs.mean_gz.data());
            const auto Proj = w.per_channel<CS>(coeffs.proj.data());
            const auto Scale = w.per_channel<CS>(coeffs.scale.data());
            for_each_element(w, [&](int64_t n, int64_t j) {
              return [g = G.line(n, j), x = X.line(n, j), y = Y.line(n, j), dx = DX.line(n, j), dr = DR.line(n, j),
                      mean = Mean.line(n, j), mean_gz = MeanGz.line(n, j), proj = Proj.line(n, j),
                      scale = Scale.line(n, j)](int64_t k) {
                const acc_t gz = relu_grad<kRelu, acc_t>(g, y, k);
                if constexpr (kInput) {
                  if constexpr (kTraining) {
                    dx[k] = static_cast<scalar_t>(
                        (gz - mean_gz[k] - (static_cast<acc_t>(x[k]) - mean[k]) * proj[k]) * scale[k]);
                  } else {
                    dx[k] = static_cast<scalar_t>(gz * scale[k]);
                  }
                }
                if constexpr (kResidual) dr[k] = static_cast<scalar_t>(gz);
              };
            });
          });
        });
      });
    });
  });
}

template <typename scalar_t, typename param_t>
void bn_backward_kernel_impl(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                             const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd,
                             bool training, bool relu, const at::Tensor& grad_input, const at::Tensor& grad_weight,
                             const at::Tensor& grad_bias, const at::Tensor& grad_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  const Walk w(view3d(input, "input"));
  const int64_t C = w.C;
  const acc_t* mean_p = mean.data_ptr<acc_t>();
  const acc_t* invstd_p = invstd.data_ptr<acc_t>();

  GradCoeffs<acc_t> coeffs{mean_p, std::vector<acc_t>(C, 0), std::vector<acc_t>(C, 0),
                           param_or<acc_t, param_t>(weight, C, 1)};
  for (int64_t c = 0; c < C; ++c) coeffs.scale[c] *= invstd_p[c];
  param_t* gw = grad_weight.defined() ? grad_weight.data_ptr<param_t>() : nullptr;
  param_t* gb = grad_bias.defined() ? grad_bias.data_ptr<param_t>() : nullptr;

  // Eval mode needs the sums only for grad_weight / grad_bias.
  const bool need_sums = gw || gb || (training && grad_input.defined());
  // With relu, the sums pass writes grad_residual (= gz), and grad_input is
  // computed from it: one tensor fewer to read than grad_output and output.
  const bool residual_first = need_sums && relu && grad_residual.defined();
  const auto elementwise = [&](const Walk& part) {
    if (residual_first) {
      if (grad_input.defined()) {
        grad_elementwise<scalar_t>(part, grad_residual, input, at::Tensor(), training, /*relu=*/false, coeffs,
                                   grad_input, at::Tensor());
      }
    } else if (grad_input.defined() || grad_residual.defined()) {
      grad_elementwise<scalar_t>(part, grad_output, input, output, training, relu, coeffs, grad_input, grad_residual);
    }
  };
  if (!need_sums) return elementwise(w);

  // The sums pass reads grad_output, input and (relu) output, and may write grad_residual.
  const int64_t first_pass_tensors = 2 + relu + residual_first;
  by_channel_blocks(w, first_pass_tensors * w.M * input.element_size(), [&](const Walk& part) {
    const std::vector<double> sums = grad_sums<scalar_t>(part, grad_output, input, output, mean_p, relu,
                                                         residual_first ? grad_residual : at::Tensor());
    for (int64_t i = 0; i < part.nc; ++i) {
      const int64_t c = part.c0 + i;
      const double sum_gz = sums[i], sum_gzxmu = sums[part.nc + i];
      if (gw) gw[c] = static_cast<acc_t>(sum_gzxmu) * invstd_p[c];
      if (gb) gb[c] = static_cast<acc_t>(sum_gz);
      if (training) {
        coeffs.mean_gz[c] = static_cast<acc_t>(sum_gz / w.M);
        coeffs.proj[c] = static_cast<acc_t>(sum_gzxmu / w.M) * invstd_p[c] * invstd_p[c];
      }
    }
    elementwise(part);
  });
}

// ---- registered ops: checks, allocation, dispatch ------------------------------

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t.value_or(at::Tensor()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_train_kernel(
    const at::Tensor& input, const std::optional<at::Tensor>& weight_opt, const std::optional<at::Tensor>& bias_opt,
    const std::optional<at::Tensor>& residual_opt, const std::optional<at::Tensor>& running_mean_opt,
    const std::optional<at::Tensor>& running_var_opt, double momentum, double eps, bool relu) {
  const at::Tensor weight = value_or_undefined(weight_opt), bias = value_or_undefined(bias_opt);
  const at::Tensor residual = value_or_undefined(residual_opt);
  const at::Tensor running_mean = value_or_undefined(running_mean_opt);
  const at::Tensor running_var = value_or_undefined(running_var_opt);
  check_input(input);
  const at::ScalarType param_dtype = check_params(
      input, {{&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}});
  if (residual.defined()) check_like_input(residual, input, "residual");
  const Strided3d v = view3d(input, "input");
  TORCH_CHECK(v.N * v.L != 1, "Expected more than 1 value per channel when training, got input size ", input.sizes());

  at::Tensor output = at::empty_like(input);
  at::Tensor save_mean = at::zeros({input.size(1)}, input.options().dtype(stat_dtype(input)));
  at::Tensor save_invstd = at::zeros_like(save_mean);
  if (input.numel() == 0) return {output, save_mean, save_invstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_forward_train_kernel", [&] {
    dispatch_param_type<scalar_t>(param_dtype, [&](auto p) {
      bn_forward_train_kernel_impl<scalar_t, decltype(p)>(input, weight, bias, residual, running_mean, running_var,
                                                          momentum, eps, relu, output, save_mean, save_invstd);
    });
  });
  return {output, save_mean, save_invstd};
}

at::Tensor bn_forward_eval_kernel(const at::Tensor& input, const std::optional<at::Tensor>& weight_opt,
                                  const std::optional<at::Tensor>& bias_opt,
                                  const std::optional<at::Tensor>& residual_opt, const at::Tensor& running_mean,
                                  const at::Tensor& running_var, double eps, bool relu) {
  const at::Tensor weight = value_or_undefined(weight_opt), bias = value_or_undefined(bias_opt);
  const at::Tensor residual = value_or_undefined(residual_opt);
  check_input(input);
  TORCH_CHECK(running_mean.defined() && running_var.defined(), "running_mean and running_var are required in eval mode");
  const at::ScalarType param_dtype = check_params(
      input, {{&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}});
  if (residual.defined()) check_like_input(residual, input, "residual");

  at::Tensor output = at::empty_like(input);
  if (input.numel() == 0) return output;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_forward_eval_kernel", [&] {
    dispatch_param_type<scalar_t>(param_dtype, [&](auto p) {
      bn_forward_eval_kernel_impl<scalar_t, decltype(p)>(input, weight, bias, residual, running_mean, running_var, eps,
                                                         relu, output);
    });
  });
  return output;
}

std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> bn_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& output_opt,
    const std::optional<at::Tensor>& weight_opt, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    bool relu, std::array<bool, 4> output_mask) {
  const at::Tensor weight = value_or_undefined(weight_opt);
  // Without relu the output is not read (it may since have been overwritten in place).
  const at::Tensor output = relu ? value_or_undefined(output_opt) : at::Tensor();
  check_input(input);
  check_like_input(grad_output, input, "grad_output");
  TORCH_CHECK(!relu || output.defined(), "output is required when relu is true (its sign is the ReLU mask)");
  if (relu) check_like_input(output, input, "output");
  // grad_weight / grad_bias take weight's dtype, or the statistics dtype without weight.
  const at::ScalarType param_dtype = check_params(input, {{&weight, "weight"}});
  check_stats(mean, input, "mean");
  check_stats(invstd, input, "invstd");

  const auto [want_input, want_weight, want_bias, want_residual] = output_mask;
  const auto param_options = input.options().dtype(param_dtype);
  at::Tensor grad_input = want_input ? at::empty_like(input) : at::Tensor();
  at::Tensor grad_weight = want_weight ? at::zeros({input.size(1)}, param_options) : at::Tensor();
  at::Tensor grad_bias = want_bias ? at::zeros({input.size(1)}, param_options) : at::Tensor();
  at::Tensor grad_residual = want_residual ? at::empty_like(input) : at::Tensor();
  const auto results = [&]() -> std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> {
    return {as_optional(grad_input), as_optional(grad_weight), as_optional(grad_bias), as_optional(grad_residual)};
  };
  if (input.numel() == 0) return results();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_kernel", [&] {
    dispatch_param_type<scalar_t>(param_dtype, [&](auto p) {
      bn_backward_kernel_impl<scalar_t, decltype(p)>(grad_output, input, output, weight, mean, invstd, training, relu,
                                                     grad_input, grad_weight, grad_bias, grad_residual);
    });
  });
  return results();
}

}  // namespace

static_assert(std::is_same_v<decltype(bn_forward_train_kernel), BnForwardTrainSignature>);
static_assert(std::is_same_v<decltype(bn_forward_eval_kernel), BnForwardEvalSignature>);
static_assert(std::is_same_v<decltype(bn_backward_kernel), BnBackwardSignature>);

TORCH_LIBRARY_IMPL(cnnkern, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("cnnkern::bn_forward_train"), TORCH_FN(bn_forward_train_kernel));
  m.impl(TORCH_SELECTIVE_NAME("cnnkern::bn_forward_eval"), TORCH_FN(bn_forward_eval_kernel));
  m.impl(TORCH_SELECTIVE_NAME("cnnkern::bn_backward"), TORCH_FN(bn_backward_kernel));
}

}  // namespace cnnkern
