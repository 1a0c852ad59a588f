// Shared helpers of the dcamkd CUDA kernels (csrc/cuda/*.cu). Each kernel file registers its host
// functions with the dispatcher (TORCH_LIBRARY_IMPL(dcamkd, CUDA, m)) for the schemas defined in
// dcamkd/ops/<op>.py. Accumulation type: float for half/bfloat16/float, double for double
// (at::opmath_type).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace dcamkd_cuda {

template <typename T>
struct Neg {
  static __device__ __forceinline__ T value() { return T(-3.0e38); }
};

// Warp reductions (full warp, all lanes active).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block reductions over blockDim.x threads (a multiple of 32, at most 1024); `sh` holds 32 T.
template <typename T>
__device__ T block_sum(T v, T* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  T r = lane < nw ? sh[lane] : T(0);
  return warp_sum(r);
}
template <typename T>
__device__ T block_max(T v, T* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  T r = lane < nw ? sh[lane] : Neg<T>::value();
  return warp_max(r);
}

// Layout of a (B, C, H, W) map: NCHW-contiguous (sC = HW, sP = 1) or channels_last (sC = 1, sP = C).
struct Layout {
  int64_t sC, sP;
};

inline Layout layout_of(const at::Tensor& x) {
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  if (x.is_contiguous()) return {HW, 1};
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "dcamkd CUDA kernels: expected an NCHW-contiguous or channels_last map, got strides ",
              x.strides());
  return {1, C};
}

inline void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "dcamkd CUDA kernels: ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "dcamkd CUDA kernels: ", name, " must be (B, C, H, W), got ", x.sizes());
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The max of a row from a max that skips NaN (fmax) and the row's sum: a NaN anywhere in the row
// makes the sum NaN, and then the max is NaN too, as torch.amax gives.
template <typename T>
__device__ __forceinline__ T max_with_nan(T m, T sum) { return sum == sum ? m : sum; }

// An empty (0,) tensor stands for "no gate" in the op schemas (Tensor[] of gates).
inline std::optional<at::Tensor> gate_or_none(const at::Tensor& g) {
  if (g.defined() && g.dim() > 1) return g;
  return std::nullopt;
}

}  // namespace dcamkd_cuda
