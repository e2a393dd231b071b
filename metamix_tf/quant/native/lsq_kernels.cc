// LSQ quantizer kernels for the CPU: each op reads its inputs once and writes its outputs
// once, instead of the XLA kernel + full-size temporaries + TensorFlow reductions of
// metamix_tf/quant/ops.py. A scalar step (activations) runs on TensorFlow's intra-op
// threads; a step per column (x seen as [rows, P], the step a [P] vector: per-channel
// weight steps, small tensors) on one thread. Like TensorFlow's element-wise ops, each op
// writes its full-size output over its first input (x forward, dy backward) when no other
// op reads that buffer: in a training step the backward's dx then reuses dy's memory
// (no fresh buffer to fault in and write-allocate). Each element is read before it is
// written, so the loops take no __restrict on those two pointers.
//
// Every element is computed with the same IEEE float32 operations, in the same order, as
// ops.py's TensorFlow definitions (x / s, max with -Qn, min with Qp, round half to even,
// multiply; no fused multiply-add; RoundW computes nearbyint's values on the clipped range),
// so outputs are bit-identical to them. Sums over the
// tensor are taken in blocks of a fixed size (not depending on the thread count), in
// float64 within a block and across blocks in block order: deterministic, and at least as
// accurate as TensorFlow's float32 reduce_sum.
//
//   MetamixLsqForward(x, step, qn, qp) -> y = round(clip(x / s, -Qn, Qp)) * s
//   MetamixLsqBackward(dy, x, step, qn, qp) -> dx = dy * 1[-Qn <= x/s <= Qp],
//       step_sum = sum(dy * (round(c) - 1[in range] * x/s)), per column for a [P] step
//   MetamixMixtureForward(x, steps, probs, qns, qps) -> y = sum_k p_k * round(c_k) * s_k
//   MetamixMixtureBackward(dy, x, steps, probs, qns, qps) -> dx = dy * sum_k p_k 1[in_k],
//       prob_sums[k] = sum(dy * round(c_k)), step_sums[k] = sum(dy * (round(c_k) - 1[in_k] v_k))
//
// Each op's `activation` attribute ("none", "relu" or "relu6") folds the ReLU / ReLU6 that
// produced the quantizer's input into it: x is then the pre-activation, each element first
// becomes a(x) = min(max(x, 0), 6 or inf) (as tf.nn.relu6 / relu: a NaN stays NaN) and dx is
// also zero unless 0 < x < 6 (or inf), as in TensorFlow's Relu6Grad / ReluGrad. The
// quantizer of a(x) then computes exactly what it computes on the activation's output, and
// neither the activation's forward pass nor its backward pass needs to run.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace metamix {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;

constexpr int64_t kBlock = 8192;  // elements per block of a sum (fixes the summation order)
constexpr int kLanes = 16;        // independent partial sums inside a block (vectorized)
constexpr int kMaxBranches = 8;

// tf.clip_by_value: minimum(x, hi), then maximum(., lo); a NaN stays NaN, as in TensorFlow.
inline float Clip(float v, float lo, float hi) {
  const float upper = v > hi ? hi : v;
  return upper < lo ? lo : upper;
}

// Round half to even: nearbyint under the default rounding mode, which TensorFlow never
// changes (GCC vectorizes nearbyint, not roundeven).
inline float RoundHalfEven(float v) { return std::nearbyint(v); }

// Base of the four kernels (CRTP): reads the `activation` attribute and runs
// Kernel::Run<true> when it folds an activation, Run<false> otherwise, so that each case has
// its own compiled loops. upper_ is the activation's upper bound (6 for relu6, inf for relu).
template <class Kernel>
class FoldingKernel : public OpKernel {
 public:
  explicit FoldingKernel(OpKernelConstruction* context) : OpKernel(context) {
    std::string name;
    OP_REQUIRES_OK(context, context->GetAttr("activation", &name));
    fold_ = name != "none";
    upper_ = name == "relu6" ? 6.0f : std::numeric_limits<float>::infinity();
  }

  void Compute(OpKernelContext* context) override {
    auto* kernel = static_cast<Kernel*>(this);
    if (fold_) {
      kernel->template Run<true>(context);
    } else {
      kernel->template Run<false>(context);
    }
  }

 protected:
  bool fold_ = false;
  float upper_ = 0.0f;
};

// The quantizer's input: a(x) when kFold, else x.
template <bool kFold>
inline float Folded(float x, float upper) {
  return kFold ? Clip(x, 0.0f, upper) : x;
}

// 1 where the folded activation passes gradient (0 < x < upper), always 1 without one;
// as a float, so that the callers' selects stay branch-free.
template <bool kFold>
inline float Passes(float x, float upper) {
  return kFold ? static_cast<float>(x > 0.0f) * static_cast<float>(x < upper) : 1.0f;
}

// Runs fn(begin, end, block) over [0, n) in blocks of kBlock on the op's intra-op threads.
template <typename Fn>
void ForBlocks(OpKernelContext* context, int64_t n, int64_t cost_per_element, Fn fn) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(blocks, cost_per_element * kBlock, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const int64_t begin = block * kBlock;
      fn(begin, std::min(n, begin + kBlock), block);
    }
  });
}

float ScalarInput(OpKernelContext* context, int index) {
  return context->input(index).scalar<float>()();
}

// Sets an InvalidArgument status (checked by the caller) unless inputs [first, last) are scalars.
void CheckScalars(OpKernelContext* context, int first, int last) {
  for (int i = first; i < last; ++i) {
    OP_REQUIRES(context, tensorflow::TensorShapeUtils::IsScalar(context->input(i).shape()),
                InvalidArgument("input ", i, " must be a scalar, got shape ",
                                context->input(i).shape().DebugString()));
  }
}

// Sets an InvalidArgument status (checked by the caller) unless dy has x's shape.
void CheckSameShape(OpKernelContext* context, const Tensor& dy, const Tensor& x) {
  OP_REQUIRES(context, dy.shape() == x.shape(),
              InvalidArgument("dy and x must have the same shape, got ",
                              dy.shape().DebugString(), " and ", x.shape().DebugString()));
}

// Reads the branch parameters (steps, probs, qns, qps), each a [K] vector; sets an
// InvalidArgument status (checked by the caller) on other shapes.
void ReadBranches(OpKernelContext* context, const std::vector<int>& inputs,
                  std::vector<std::vector<float>>* out, int* num_branches) {
  const int64_t k = context->input(inputs[0]).NumElements();
  OP_REQUIRES(context, k >= 1 && k <= kMaxBranches,
              InvalidArgument("the number of branches must be in [1, ", kMaxBranches,
                              "], got ", k));
  for (int index : inputs) {
    const Tensor& t = context->input(index);
    OP_REQUIRES(context, t.dims() == 1 && t.NumElements() == k,
                InvalidArgument("input ", index, " must have shape [", k, "], got ",
                                t.shape().DebugString()));
    auto flat = t.flat<float>();
    out->emplace_back(flat.data(), flat.data() + k);
  }
  *num_branches = static_cast<int>(k);
}

// Runs chunk(x, g, out) on every kLanes elements of [begin, end): on the tensors themselves
// for whole chunks, on zero-padded copies for the last partial one (only its `end - start`
// outputs are copied back). Fixed-length chunks let the compiler vectorize each one.
template <typename Chunk>
void ForChunks(int64_t begin, int64_t end, const float* x, const float* g, float* out,
               Chunk chunk) {
  int64_t start = begin;
  for (; start + kLanes <= end; start += kLanes) {
    chunk(x + start, g == nullptr ? nullptr : g + start, out + start);
  }
  if (start == end) return;
  float x_pad[kLanes] = {}, g_pad[kLanes] = {}, out_pad[kLanes];
  std::copy(x + start, x + end, x_pad);
  if (g != nullptr) std::copy(g + start, g + end, g_pad);
  chunk(x_pad, g == nullptr ? nullptr : g_pad, out_pad);
  std::copy(out_pad, out_pad + (end - start), out + start);
}

// Four lanes at a time as GCC / Clang vector types: written as a plain loop, GCC left the
// float -> double conversions and adds scalar (32 instructions per chunk in the backward
// kernels' hot loop, which then ran at a quarter of memory speed). Each lane still adds
// its own terms in chunk order, so the sums are unchanged.
typedef float Floats4 __attribute__((vector_size(4 * sizeof(float))));
typedef double Doubles4 __attribute__((vector_size(4 * sizeof(double))));

inline void AddLanes(const float* __restrict term, double* __restrict lanes) {
  static_assert(kLanes % 4 == 0, "AddLanes adds four lanes at a time");
  for (int l = 0; l < kLanes; l += 4) {
    Floats4 terms;
    Doubles4 sums;
    __builtin_memcpy(&terms, term + l, sizeof(terms));
    __builtin_memcpy(&sums, lanes + l, sizeof(sums));
    sums += __builtin_convertvector(terms, Doubles4);
    __builtin_memcpy(lanes + l, &sums, sizeof(sums));
  }
}

inline double SumLanes(const double* lanes) {
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// The kernels with a scalar step work on a chunk's 16 elements as GCC / Clang vector types
// as wide as the CPU's registers (16 lanes with AVX-512, 8 with AVX, else 4), each lane
// computing what the scalar code computes for its element, each sum lane adding its terms
// in chunk order. Written as plain loops, their vectorization was the compiler's: GCC left
// the float64 sums scalar (the backward then ran at a quarter of memory speed), kept the
// mixture's branches partly scalar, and its loops changed speed with the -march level.
#if defined(__AVX512F__)
constexpr int kWidth = 16;
#elif defined(__AVX__)
constexpr int kWidth = 8;
#else
constexpr int kWidth = 4;
#endif
static_assert(kLanes % kWidth == 0, "a chunk is a whole number of vectors");
// The single quantizer (bound by memory) on vector types only with AVX-512: with AVX2 the
// compiler's own loops over the chunk were as fast or faster (measured with
// benchmarks/native_kernels.py; vectors twice the register width lowered badly).
constexpr bool kVectorLsq = kWidth == 16;
typedef float FloatsW __attribute__((vector_size(kWidth * sizeof(float))));
typedef double DoublesW __attribute__((vector_size(kWidth * sizeof(double))));

inline FloatsW LoadW(const float* p) {
  FloatsW v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreW(float* p, FloatsW v) { __builtin_memcpy(p, &v, sizeof(v)); }

inline FloatsW SplatW(float value) { return FloatsW{} + value; }

// Clip per lane, as Clip (a NaN stays NaN).
inline FloatsW ClipW(FloatsW v, FloatsW lo, FloatsW hi) {
  const FloatsW upper = v > hi ? hi : v;
  return upper < lo ? lo : upper;
}

typedef int32_t IntsW __attribute__((vector_size(kWidth * sizeof(int32_t))));

// Round half to even per lane, as RoundHalfEven, for |v| < 2^22 (the clipped grid values:
// Qp < 2^16) and NaN: adding and subtracting 1.5 * 2^23 rounds to an integer in the default
// rounding mode; v's sign bit then makes -0.5 < v <= -0 give -0, as nearbyint does.
inline FloatsW RoundW(FloatsW v) {
  const FloatsW magic = SplatW(12582912.0f);
  const FloatsW rounded = (v + magic) - magic;
  IntsW bits, sign;
  __builtin_memcpy(&bits, &rounded, sizeof(bits));
  __builtin_memcpy(&sign, &v, sizeof(sign));
  bits |= sign & std::numeric_limits<int32_t>::min();
  FloatsW out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}

template <bool kFold>
inline FloatsW FoldedW(FloatsW x, FloatsW upper) {
  return kFold ? ClipW(x, SplatW(0.0f), upper) : x;
}

template <bool kFold>
inline FloatsW PassesW(FloatsW x, FloatsW upper) {
  const FloatsW one = SplatW(1.0f), zero = SplatW(0.0f);
  return kFold ? ((x > zero) & (x < upper) ? one : zero) : one;
}

// AddLanes for one vector of terms, into lanes [0, kWidth) of `lanes`.
inline void AddLanesW(FloatsW terms, double* __restrict lanes) {
  DoublesW sums;
  __builtin_memcpy(&sums, lanes, sizeof(sums));
  sums += __builtin_convertvector(terms, DoublesW);
  __builtin_memcpy(lanes, &sums, sizeof(sums));
}

// SumLanes of kLanes sums held as kLanes / kWidth vectors.
inline double SumLanesW(const DoublesW* sums) {
  double lanes[kLanes];
  __builtin_memcpy(lanes, sums, sizeof(lanes));
  return SumLanes(lanes);
}

// The branch parameters, each broadcast to a vector.
struct BranchesW {
  FloatsW steps[kMaxBranches], probs[kMaxBranches], los[kMaxBranches], his[kMaxBranches];
  int k = 0;
};

// Reads the branch parameters of ReadBranches (inputs steps, probs, qns, qps).
void ReadBranchesW(OpKernelContext* context, const std::vector<int>& inputs,
                   BranchesW* out) {
  std::vector<std::vector<float>> p;
  ReadBranches(context, inputs, &p, &out->k);
  if (!context->status().ok()) return;
  for (int b = 0; b < out->k; ++b) {
    out->steps[b] = SplatW(p[0][b]);
    out->probs[b] = SplatW(p[1][b]);
    out->los[b] = SplatW(-p[2][b]);
    out->his[b] = SplatW(p[3][b]);
  }
}

// kernel->RunBranches<kFold, K>(context, br) for K = br.k: the branch count known at compile
// time, so the loops over branches unroll and per-branch sums stay in vector registers.
template <bool kFold, class Kernel>
void DispatchBranches(Kernel* kernel, OpKernelContext* context, const BranchesW& br) {
  switch (br.k) {
    case 1: return kernel->template RunBranches<kFold, 1>(context, br);
    case 2: return kernel->template RunBranches<kFold, 2>(context, br);
    case 3: return kernel->template RunBranches<kFold, 3>(context, br);
    case 4: return kernel->template RunBranches<kFold, 4>(context, br);
    case 5: return kernel->template RunBranches<kFold, 5>(context, br);
    case 6: return kernel->template RunBranches<kFold, 6>(context, br);
    case 7: return kernel->template RunBranches<kFold, 7>(context, br);
    default: return kernel->template RunBranches<kFold, 8>(context, br);
  }
}

// The number of columns P of a step: 1 for a scalar, P for a [P] vector whose length
// divides x's size; sets an InvalidArgument status (checked by the caller) otherwise.
int64_t StepColumns(OpKernelContext* context, const Tensor& step, const Tensor& x) {
  if (tensorflow::TensorShapeUtils::IsScalar(step.shape())) return 1;
  const int64_t columns = step.NumElements();
  if (step.dims() != 1 || columns == 0 || x.NumElements() % columns != 0) {
    context->SetStatus(InvalidArgument("step must be a scalar or a vector whose length "
                                       "divides x's size, got step ",
                                       step.shape().DebugString(), " for x ",
                                       x.shape().DebugString()));
    return 0;
  }
  return columns;
}

class LsqForward : public FoldingKernel<LsqForward> {
 public:
  explicit LsqForward(OpKernelConstruction* c) : FoldingKernel(c) {}

  template <bool kFold>
  void Run(OpKernelContext* context) {
    CheckScalars(context, 2, 4);
    const Tensor& x = context->input(0);
    const int64_t columns = StepColumns(context, context->input(1), x);
    if (!context->status().ok()) return;
    Tensor* y = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
    const float lo = -ScalarInput(context, 2), hi = ScalarInput(context, 3), upper = upper_;
    const float* in = x.flat<float>().data();
    float* out = y->flat<float>().data();
    const float* steps = context->input(1).flat<float>().data();
    if (columns > 1) {
      for (int64_t row = 0; row < x.NumElements(); row += columns) {
        const float* xs = in + row;  // ys may be xs (no __restrict)
        float* ys = out + row;
        for (int64_t p = 0; p < columns; ++p) {
          const float a = Folded<kFold>(xs[p], upper);
          ys[p] = RoundHalfEven(Clip(a / steps[p], lo, hi)) * steps[p];
        }
      }
      return;
    }
    const float step = steps[0];
    ForBlocks(context, x.NumElements(), 4, [&](int64_t begin, int64_t end, int64_t) {
      ForChunks(begin, end, in, nullptr, out,
                [&](const float* xs, const float*, float* ys) {
                  if constexpr (kVectorLsq) {
                    const FloatsW s = SplatW(step), los = SplatW(lo), his = SplatW(hi);
                    const FloatsW uppers = SplatW(upper);
                    for (int l = 0; l < kLanes; l += kWidth) {
                      const FloatsW a = FoldedW<kFold>(LoadW(xs + l), uppers);
                      StoreW(ys + l, RoundW(ClipW(a / s, los, his)) * s);
                    }
                  } else {
                    for (int l = 0; l < kLanes; ++l) {
                      const float a = Folded<kFold>(xs[l], upper);
                      ys[l] = RoundHalfEven(Clip(a / step, lo, hi)) * step;
                    }
                  }
                });
    });
  }
};

class LsqBackward : public FoldingKernel<LsqBackward> {
 public:
  explicit LsqBackward(OpKernelConstruction* c) : FoldingKernel(c) {}

  template <bool kFold>
  void Run(OpKernelContext* context) {
    const Tensor& dy = context->input(0);
    const Tensor& x = context->input(1);
    CheckSameShape(context, dy, x);
    CheckScalars(context, 3, 5);
    const int64_t columns = StepColumns(context, context->input(2), x);
    if (!context->status().ok()) return;
    Tensor *dx = nullptr, *step_sum = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, x.shape(), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(2).shape(), &step_sum));
    const float lo = -ScalarInput(context, 3), hi = ScalarInput(context, 4), upper = upper_;
    const int64_t n = x.NumElements();
    const float* steps = context->input(2).flat<float>().data();
    if (columns > 1) {
      std::vector<double> sums(columns, 0.0);
      for (int64_t row = 0; row < n; row += columns) {
        const float* __restrict xs = x.flat<float>().data() + row;
        const float* gs = dy.flat<float>().data() + row;  // dxs may be gs (no __restrict)
        float* dxs = dx->flat<float>().data() + row;
        double* __restrict column_sums = sums.data();
        for (int64_t p = 0; p < columns; ++p) {
          const float v = Folded<kFold>(xs[p], upper) / steps[p];
          const float c = Clip(v, lo, hi);
          const float grad = gs[p];
          const float v_inside = v == c ? v : 0.0f;
          dxs[p] = v == c ? grad * Passes<kFold>(xs[p], upper) : 0.0f;
          column_sums[p] += static_cast<double>(grad * (RoundHalfEven(c) - v_inside));
        }
      }
      auto out = step_sum->flat<float>();
      for (int64_t p = 0; p < columns; ++p) out(p) = static_cast<float>(sums[p]);
      return;
    }
    const float step = steps[0];
    std::vector<double> partial((n + kBlock - 1) / kBlock, 0.0);
    ForBlocks(context, n, 8, [&](int64_t begin, int64_t end, int64_t block) {
      double lanes[kLanes] = {};
      ForChunks(begin, end, x.flat<float>().data(), dy.flat<float>().data(),
                dx->flat<float>().data(),
                [&](const float* __restrict xs, const float* gs, float* dxs) {
                  if constexpr (kVectorLsq) {
                    const FloatsW s = SplatW(step), los = SplatW(lo), his = SplatW(hi);
                    const FloatsW uppers = SplatW(upper), zero = SplatW(0.0f);
                    for (int l = 0; l < kLanes; l += kWidth) {
                      const FloatsW xv = LoadW(xs + l), grad = LoadW(gs + l);
                      const FloatsW v = FoldedW<kFold>(xv, uppers) / s;
                      const FloatsW c = ClipW(v, los, his);
                      StoreW(dxs + l, v == c ? grad * PassesW<kFold>(xv, uppers) : zero);
                      AddLanesW(grad * (RoundW(c) - (v == c ? v : zero)), lanes + l);
                    }
                  } else {
                    float term[kLanes];
                    for (int l = 0; l < kLanes; ++l) {
                      // (comparisons written out: a bool local makes GCC branch, not blend)
                      const float v = Folded<kFold>(xs[l], upper) / step;
                      const float c = Clip(v, lo, hi);
                      const float grad = gs[l];
                      const float v_inside = v == c ? v : 0.0f;
                      dxs[l] = v == c ? grad * Passes<kFold>(xs[l], upper) : 0.0f;
                      term[l] = grad * (RoundHalfEven(c) - v_inside);
                    }
                    AddLanes(term, lanes);
                  }
                });
      partial[block] = SumLanes(lanes);
    });
    double total = 0.0;
    for (double p : partial) total += p;
    step_sum->scalar<float>()() = static_cast<float>(total);
  }
};

class MixtureForward : public FoldingKernel<MixtureForward> {
 public:
  explicit MixtureForward(OpKernelConstruction* c) : FoldingKernel(c) {}

  template <bool kFold>
  void Run(OpKernelContext* context) {
    BranchesW br;
    ReadBranchesW(context, {1, 2, 3, 4}, &br);
    if (!context->status().ok()) return;
    DispatchBranches<kFold>(this, context, br);
  }

  template <bool kFold, int K>
  void RunBranches(OpKernelContext* context, const BranchesW& br) {
    const Tensor& x = context->input(0);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
    const FloatsW upper = SplatW(upper_);
    ForBlocks(context, x.NumElements(), 4 * K, [&](int64_t begin, int64_t end, int64_t) {
      ForChunks(begin, end, x.flat<float>().data(), nullptr, y->flat<float>().data(),
                [&](const float* xs, const float*, float* ys) {
                  for (int l = 0; l < kLanes; l += kWidth) {
                    const FloatsW a = FoldedW<kFold>(LoadW(xs + l), upper);
                    FloatsW acc = SplatW(0.0f);
                    for (int b = 0; b < K; ++b) {
                      const FloatsW s = br.steps[b];
                      acc += br.probs[b] * (RoundW(ClipW(a / s, br.los[b], br.his[b])) * s);
                    }
                    StoreW(ys + l, acc);
                  }
                });
    });
  }
};

class MixtureBackward : public FoldingKernel<MixtureBackward> {
 public:
  explicit MixtureBackward(OpKernelConstruction* c) : FoldingKernel(c) {}

  template <bool kFold>
  void Run(OpKernelContext* context) {
    BranchesW br;
    ReadBranchesW(context, {2, 3, 4, 5}, &br);
    if (!context->status().ok()) return;
    DispatchBranches<kFold>(this, context, br);
  }

  template <bool kFold, int K>
  void RunBranches(OpKernelContext* context, const BranchesW& br) {
    static_assert(K <= kMaxBranches, "at most kMaxBranches branches");
    constexpr int kVectors = kLanes / kWidth;
    const Tensor& dy = context->input(0);
    const Tensor& x = context->input(1);
    CheckSameShape(context, dy, x);
    if (!context->status().ok()) return;
    Tensor *dx = nullptr, *prob_sums = nullptr, *step_sums = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, x.shape(), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({K}), &prob_sums));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({K}), &step_sums));
    const FloatsW upper = SplatW(upper_);
    const int64_t blocks = (x.NumElements() + kBlock - 1) / kBlock;
    // partial[(block * K + b) * 2 + {0: probability term, 1: step term}]
    std::vector<double> partial(blocks * K * 2, 0.0);
    ForBlocks(context, x.NumElements(), 10 * K, [&](int64_t begin, int64_t end,
                                                    int64_t block) {
      // per branch, its sums as vectors: in registers across the block
      DoublesW prob_acc[K][kVectors] = {}, step_acc[K][kVectors] = {};
      ForChunks(begin, end, x.flat<float>().data(), dy.flat<float>().data(),
                dx->flat<float>().data(),
                [&](const float* __restrict xs, const float* gs, float* dxs) {
                  for (int w = 0; w < kVectors; ++w) {
                    const FloatsW xv = LoadW(xs + w * kWidth), grad = LoadW(gs + w * kWidth);
                    const FloatsW zero = SplatW(0.0f);
                    const FloatsW a = FoldedW<kFold>(xv, upper);
                    const FloatsW passes = PassesW<kFold>(xv, upper);
                    FloatsW gate = zero;
                    for (int b = 0; b < K; ++b) {
                      const FloatsW v = a / br.steps[b];
                      const FloatsW c = ClipW(v, br.los[b], br.his[b]);
                      const FloatsW r = RoundW(c);
                      gate += v == c ? br.probs[b] * passes : zero;
                      prob_acc[b][w] += __builtin_convertvector(grad * r, DoublesW);
                      step_acc[b][w] += __builtin_convertvector(
                          grad * (r - (v == c ? v : zero)), DoublesW);
                    }
                    StoreW(dxs + w * kWidth, grad * gate);
                  }
                });
      for (int b = 0; b < K; ++b) {
        partial[(block * K + b) * 2] = SumLanesW(prob_acc[b]);
        partial[(block * K + b) * 2 + 1] = SumLanesW(step_acc[b]);
      }
    });
    auto prob_out = prob_sums->flat<float>();
    auto step_out = step_sums->flat<float>();
    for (int b = 0; b < K; ++b) {
      double prob = 0.0, step = 0.0;
      for (int64_t block = 0; block < blocks; ++block) {
        prob += partial[(block * K + b) * 2];
        step += partial[(block * K + b) * 2 + 1];
      }
      prob_out(b) = static_cast<float>(prob);
      step_out(b) = static_cast<float>(step);
    }
  }
};

using tensorflow::shape_inference::InferenceContext;

tensorflow::Status SameAsFirst(InferenceContext* c) {
  c->set_output(0, c->input(0));
  return tensorflow::OkStatus();
}

REGISTER_OP("MetamixLsqForward")
    .Input("x: float")
    .Input("step: float")
    .Input("qn: float")
    .Input("qp: float")
    .Output("y: float")
    .Attr("activation: {'none', 'relu', 'relu6'} = 'none'")
    .SetShapeFn(SameAsFirst);

REGISTER_OP("MetamixLsqBackward")
    .Input("dy: float")
    .Input("x: float")
    .Input("step: float")
    .Input("qn: float")
    .Input("qp: float")
    .Output("dx: float")
    .Output("step_sum: float")
    .Attr("activation: {'none', 'relu', 'relu6'} = 'none'")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(2));
      return tensorflow::OkStatus();
    });

REGISTER_OP("MetamixMixtureForward")
    .Input("x: float")
    .Input("steps: float")
    .Input("probs: float")
    .Input("qns: float")
    .Input("qps: float")
    .Output("y: float")
    .Attr("activation: {'none', 'relu', 'relu6'} = 'none'")
    .SetShapeFn(SameAsFirst);

REGISTER_OP("MetamixMixtureBackward")
    .Input("dy: float")
    .Input("x: float")
    .Input("steps: float")
    .Input("probs: float")
    .Input("qns: float")
    .Input("qps: float")
    .Output("dx: float")
    .Output("prob_sums: float")
    .Output("step_sums: float")
    .Attr("activation: {'none', 'relu', 'relu6'} = 'none'")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(1));
      c->set_output(1, c->input(2));
      c->set_output(2, c->input(2));
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("MetamixLsqForward").Device(tensorflow::DEVICE_CPU), LsqForward);
REGISTER_KERNEL_BUILDER(Name("MetamixLsqBackward").Device(tensorflow::DEVICE_CPU), LsqBackward);
REGISTER_KERNEL_BUILDER(Name("MetamixMixtureForward").Device(tensorflow::DEVICE_CPU),
                        MixtureForward);
REGISTER_KERNEL_BUILDER(Name("MetamixMixtureBackward").Device(tensorflow::DEVICE_CPU),
                        MixtureBackward);

}  // namespace
}  // namespace metamix
