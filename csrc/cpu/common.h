// Shared helpers of the dcamkd CPU kernels: accumulation types, a vectorisable exp, mode codes,
// NaN-propagating clamps. Each kernel file registers its functions with the dispatcher
// (TORCH_LIBRARY_IMPL(dcamkd, CPU, m)) for the schemas defined in dcamkd/ops/<op>.py.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace dcamkd {

// float32 accumulation for float16/bfloat16/float32 inputs, float64 for float64.
template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

#define DCAMKD_INLINE inline __attribute__((always_inline))

// exp for x in (-inf, 88]: Cephes-style range reduction x = n ln2 + r, degree-6 polynomial,
// 2^n formed in the exponent bits. Branch-free and call-free, so loops calling it vectorise
// (checked with -fopt-info-vec: needs -fno-trapping-math, which _build.py passes, and a floor
// the target can vectorise: vroundps with SSE4.1/AVX, frintm on AArch64; plain SSE2 gets the
// compare-and-subtract floor, which GCC if-converts there).
// Max relative error ~2 ulp on [-87, 88]; inputs below -87 give ~1.6e-38 instead of 0 (the
// kernels only call it on x - max <= 0, where such terms are negligible against the max's 1).
DCAMKD_INLINE float vexp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float fx = x * 1.44269504088896341f + 0.5f;
#if defined(__SSE4_1__) || defined(__aarch64__) || defined(__ARM_NEON)
  float fl = std::floor(fx);
#else
  float fl = static_cast<float>(static_cast<int32_t>(fx));
  fl = fl > fx ? fl - 1.0f : fl;
#endif
  x = x - fl * 0.693359375f - fl * -2.12194440e-4f;
  float z = x * x;
  float y = 1.9875691500E-4f;
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * z + x + 1.0f;
  int32_t bits = (static_cast<int32_t>(fl) + 127) << 23;
  float p;
  std::memcpy(&p, &bits, sizeof(p));
  return y * p;
}
DCAMKD_INLINE double vexp(double x) { return std::exp(x); }

// Layout-neutral modes: a reduction along the inner (contiguous) axis of a (NO, NI) slab gives
// one row per outer index (R_INNER); along the outer axis, one row per inner index (R_OUTER).
enum Red : int { R_NONE = 0, R_INNER = 1, R_OUTER = 2 };

template <typename F>
void dispatch_red2(int a, int b, F&& f) {
#define DCAMKD_CASE(A, B) \
  if (a == A && b == B) return f(std::integral_constant<int, A>{}, std::integral_constant<int, B>{});
  DCAMKD_CASE(0, 0) DCAMKD_CASE(0, 1) DCAMKD_CASE(0, 2)
  DCAMKD_CASE(1, 0) DCAMKD_CASE(1, 1) DCAMKD_CASE(1, 2)
  DCAMKD_CASE(2, 0) DCAMKD_CASE(2, 1) DCAMKD_CASE(2, 2)
#undef DCAMKD_CASE
  TORCH_CHECK(false, "dcamkd: bad reduction codes");
}

#define DCAMKD_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// True when the 4-D tensor is stored channels_last (and not also NCHW-contiguous).
inline bool is_cl(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "dcamkd: expected an NCHW-contiguous or channels_last tensor");
  return true;
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// max(x, lo) that keeps NaN (the reference's clamp_min): a comparison with NaN is false, so NaN
// falls through to x. Same cost as the value-based max it replaces.
template <typename A>
DCAMKD_INLINE A clamp_min_nan(A x, A lo) { return x < lo ? lo : x; }

// The max of a row from a max that skips NaN (vectorised `v > m ? v : m`) and the row's sum: a
// NaN anywhere in the row makes the sum NaN, and then the max is NaN too, as torch.amax gives
// (a sum of +Inf and -Inf is NaN as well: the max is then non-finite either way).
template <typename A>
DCAMKD_INLINE A max_with_nan(A m, A sum) { return sum == sum ? m : sum; }

// An empty (0,) tensor stands for "no gate" in the op schemas (Tensor[] of gates); a gate is
// (B, C) or (B, H, W).
inline const at::Tensor* gate_or_null(const at::Tensor& g) { return g.defined() && g.dim() > 1 ? &g : nullptr; }

}  // namespace dcamkd
