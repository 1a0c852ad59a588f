// Per-level anomaly map d(t_p, s_p) on CUDA: op dcamkd::anomaly_map (forward only; schema and
// fake implementation in dcamkd/ops/anomaly_map.py; spec dcamkd/reference.py anomaly_map_level).
// NaN and Inf give NaN (the norms' eps clamp passes NaN on through |x| / max(|x|, eps)). One thread per (b, p), loop over channels:
// T and S read once (coalesced over p in NCHW), the (B, H, W) map written once.
#include "common.cuh"

namespace dcamkd_cuda {

template <typename scalar_t, typename acc_t>
__global__ void amap_kernel(const scalar_t* __restrict__ t, const scalar_t* __restrict__ s, int64_t C,
                            int64_t HW, Layout L, acc_t eps, acc_t* __restrict__ out) {
  const int64_t b = blockIdx.y, p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= HW) return;
  const int64_t base = b * C * HW + p * L.sP;
  acc_t tt = 0, ss = 0, ts = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t tv = static_cast<acc_t>(t[base + c * L.sC]);
    const acc_t sv = static_cast<acc_t>(s[base + c * L.sC]);
    tt += tv * tv;
    ss += sv * sv;
    ts += tv * sv;
  }
  const acc_t nt_raw = sqrt(tt), ns_raw = sqrt(ss);
  const acc_t nt = max(nt_raw, eps), ns = max(ns_raw, eps);
  const acc_t rt = nt_raw / nt, rs = ns_raw / ns;
  out[b * HW + p] = acc_t(0.5) * (rt * rt + rs * rs) - ts / (nt * ns);
}

at::Tensor anomaly_map(const at::Tensor& t, const at::Tensor& s, double eps) {
  check_cuda(t, "teacher");
  check_cuda(s, "student");
  TORCH_CHECK(t.sizes() == s.sizes() && t.scalar_type() == s.scalar_type(),
              "dcamkd CUDA anomaly_map: teacher and student must agree in shape and dtype");
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t B = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3), HW = H * W;
  const Layout L = layout_of(t);
  TORCH_CHECK(layout_of(s).sC == L.sC, "dcamkd CUDA anomaly_map: teacher and student layouts differ");
  const auto acc = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, H, W}, t.options().dtype(acc));
  if (B * HW == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "dcamkd_amap", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dim3 grid(cdiv(HW, 256), B);
    amap_kernel<scalar_t, acc_t><<<grid, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        t.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), C, HW, L, acc_t(eps), out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(dcamkd, CUDA, m) {
  m.impl("anomaly_map", &anomaly_map);
}

}  // namespace dcamkd_cuda
