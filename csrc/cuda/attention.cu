// DCAM attention pieces on CUDA: ops dcamkd::channel_pool, spatial_pool, apply_gates and their
// backward ops (schemas, fake implementations and autograd in dcamkd/ops/attention.py; spec
// dcamkd/reference.py channel_pool, spatial_pool, apply_gates). A NaN in a pooled row gives a NaN
// mean and max (max_with_nan), as torch.amax does. The max's gradient is split evenly among ties (autograd of amax);
// the contract saves only the max, so the backward counts ties first (x read twice).
#include "common.cuh"

#include <tuple>

namespace dcamkd_cuda {

// One block per row (b, c); threads stride over locations.
template <typename scalar_t, typename acc_t>
__global__ void cpool_fwd_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t HW, Layout L,
                                 acc_t* __restrict__ mean, acc_t* __restrict__ mx) {
  __shared__ acc_t sh[32];
  const int64_t r = blockIdx.x, b = r / C, c = r % C;
  const int64_t base = b * C * HW + c * L.sC;
  acc_t sm = 0, m = Neg<acc_t>::value();
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
    const acc_t v = static_cast<acc_t>(x[base + p * L.sP]);
    sm += v;
    m = max(m, v);
  }
  sm = block_sum(sm, sh);
  m = block_max(m, sh);
  if (threadIdx.x == 0) {
    mean[r] = sm / acc_t(HW);
    mx[r] = max_with_nan(m, sm);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cpool_bwd_kernel(const acc_t* __restrict__ g_avg, const acc_t* __restrict__ g_max,
                                 const scalar_t* __restrict__ x, const acc_t* __restrict__ mx,
                                 int64_t C, int64_t HW, Layout L, scalar_t* __restrict__ dx) {
  __shared__ acc_t sh[32];
  const int64_t r = blockIdx.x, b = r / C, c = r % C;
  const int64_t base = b * C * HW + c * L.sC;
  const acc_t m = mx[r];
  acc_t cnt = 0;
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x)
    cnt += static_cast<acc_t>(x[base + p * L.sP]) == m ? acc_t(1) : acc_t(0);
  cnt = block_sum(cnt, sh);
  const acc_t gm = g_avg[r] / acc_t(HW), gx = g_max[r] / max(cnt, acc_t(1));
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
    const int64_t o = base + p * L.sP;
    const acc_t v = static_cast<acc_t>(x[o]);
    dx[o] = static_cast<scalar_t>(gm + (v == m ? gx : acc_t(0)));
  }
}

// One thread per (b, p) (grid.y = b), loop over channels.
template <typename scalar_t, typename acc_t>
__global__ void spool_fwd_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ a,
                                 int64_t C, int64_t HW, Layout L, acc_t* __restrict__ mean,
                                 acc_t* __restrict__ mx) {
  const int64_t b = blockIdx.y, p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= HW) return;
  const int64_t base = b * C * HW + p * L.sP;
  acc_t sm = 0, m = Neg<acc_t>::value();
  for (int64_t c = 0; c < C; ++c) {
    acc_t v = static_cast<acc_t>(x[base + c * L.sC]);
    if (a) v *= a[b * C + c];
    sm += v;
    m = max(m, v);
  }
  mean[b * HW + p] = sm / acc_t(C);
  mx[b * HW + p] = max_with_nan(m, sm);
}

template <typename scalar_t, typename acc_t>
__global__ void spool_bwd_kernel(const acc_t* __restrict__ g_avg, const acc_t* __restrict__ g_max,
                                 const scalar_t* __restrict__ x, const acc_t* __restrict__ a,
                                 const acc_t* __restrict__ mx, int64_t C, int64_t HW, Layout L,
                                 scalar_t* __restrict__ dx, acc_t* __restrict__ da) {
  const int64_t b = blockIdx.y, p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const bool valid = p < HW;
  const int64_t q = valid ? p : 0;
  const int64_t base = b * C * HW + q * L.sP;
  const acc_t m = mx[b * HW + q];
  acc_t cnt = 0;
  for (int64_t c = 0; c < C; ++c) {
    acc_t v = static_cast<acc_t>(x[base + c * L.sC]);
    if (a) v *= a[b * C + c];
    cnt += v == m ? acc_t(1) : acc_t(0);
  }
  const acc_t gm = g_avg[b * HW + q] / acc_t(C), gx = g_max[b * HW + q] / max(cnt, acc_t(1));
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = base + c * L.sC;
    const acc_t v = static_cast<acc_t>(x[o]);
    const acc_t av = a ? a[b * C + c] : acc_t(1);
    acc_t g = gm + (v * av == m ? gx : acc_t(0));
    if (!valid) g = 0;
    if (valid) dx[o] = static_cast<scalar_t>(g * av);
    if (da) {
      const acc_t w = warp_sum(g * v);
      if ((threadIdx.x & 31) == 0) atomicAdd(da + b * C + c, w);
    }
  }
}

// Elementwise over memory order (coalesced for both layouts).
template <typename scalar_t, typename acc_t>
__global__ void gate_fwd_kernel(const scalar_t* __restrict__ s, const acc_t* __restrict__ a,
                                const acc_t* __restrict__ m, int64_t N, int64_t C, int64_t HW,
                                bool channels_last, scalar_t* __restrict__ out) {
  for (int64_t o = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; o < N;
       o += (int64_t)gridDim.x * blockDim.x) {
    int64_t b, c, p;
    if (channels_last) {
      c = o % C;
      p = (o / C) % HW;
      b = o / (C * HW);
    } else {
      p = o % HW;
      c = (o / HW) % C;
      b = o / (C * HW);
    }
    acc_t v = static_cast<acc_t>(s[o]);
    if (a) v *= a[b * C + c];
    if (m) v *= m[b * HW + p];
    out[o] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gate_bwd_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ s,
                                const acc_t* __restrict__ a, const acc_t* __restrict__ m,
                                int64_t C, int64_t HW, Layout L, scalar_t* __restrict__ ds,
                                acc_t* __restrict__ da, acc_t* __restrict__ dm) {
  const int64_t b = blockIdx.y, p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const bool valid = p < HW;
  const int64_t q = valid ? p : 0;
  const int64_t base = b * C * HW + q * L.sP;
  const acc_t mv = m ? m[b * HW + q] : acc_t(1);
  acc_t dm_acc = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = base + c * L.sC;
    const acc_t g = valid ? static_cast<acc_t>(go[o]) : acc_t(0);
    const acc_t av = a ? a[b * C + c] : acc_t(1);
    if (valid) ds[o] = static_cast<scalar_t>(g * av * mv);
    if (da || dm) {
      const acc_t gs = g * static_cast<acc_t>(s[o]);
      if (da) {
        const acc_t w = warp_sum(gs * mv);
        if ((threadIdx.x & 31) == 0) atomicAdd(da + b * C + c, w);
      }
      dm_acc += gs * av;
    }
  }
  if (dm && valid) dm[b * HW + p] = dm_acc;
}

static at::ScalarType acc_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

static at::Tensor opt_acc2(const std::optional<at::Tensor>& g, at::ScalarType acc) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  return g->to(acc).contiguous();
}

std::tuple<at::Tensor, at::Tensor> channel_pool(const at::Tensor& x) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const Layout L = layout_of(x);
  auto opts = x.options().dtype(acc_of(x));
  at::Tensor mean = at::empty({B, C}, opts), mx = at::empty({B, C}, opts);
  if (B * C == 0) return {mean, mx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dcamkd_cpool_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpool_fwd_kernel<scalar_t, acc_t><<<B * C, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), C, HW, L, mean.data_ptr<acc_t>(), mx.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, mx};
}

at::Tensor channel_pool_backward(const at::Tensor& g_avg, const at::Tensor& g_max, const at::Tensor& x,
                            const at::Tensor& mx) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const Layout L = layout_of(x);
  const auto acc = acc_of(x);
  at::Tensor ga = g_avg.to(acc).contiguous(), gm = g_max.to(acc).contiguous(), m = mx.to(acc).contiguous();
  at::Tensor dx = at::empty_like(x);
  if (B * C == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dcamkd_cpool_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpool_bwd_kernel<scalar_t, acc_t><<<B * C, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ga.data_ptr<acc_t>(), gm.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), m.data_ptr<acc_t>(), C, HW, L,
        dx.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor> spatial_pool(const at::Tensor& x,
                                                    const std::optional<at::Tensor>& channel_gate) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const Layout L = layout_of(x);
  const auto acc = acc_of(x);
  at::Tensor a = opt_acc2(channel_gate, acc);
  auto opts = x.options().dtype(acc);
  at::Tensor mean = at::empty({B, H, W}, opts), mx = at::empty({B, H, W}, opts);
  if (B * HW == 0) return {mean, mx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dcamkd_spool_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dim3 grid(cdiv(HW, 256), B);
    spool_fwd_kernel<scalar_t, acc_t><<<grid, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), a.defined() ? a.data_ptr<acc_t>() : nullptr, C, HW, L,
        mean.data_ptr<acc_t>(), mx.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, mx};
}

std::tuple<at::Tensor, at::Tensor> spatial_pool_backward(const at::Tensor& g_avg, const at::Tensor& g_max,
                                                    const at::Tensor& x,
                                                    const std::optional<at::Tensor>& channel_gate,
                                                    const at::Tensor& mx) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const Layout L = layout_of(x);
  const auto acc = acc_of(x);
  at::Tensor a = opt_acc2(channel_gate, acc);
  at::Tensor ga = g_avg.to(acc).contiguous(), gm = g_max.to(acc).contiguous(), m = mx.to(acc).contiguous();
  auto opts = x.options().dtype(acc);
  at::Tensor dx = at::empty_like(x);
  at::Tensor da = a.defined() ? at::zeros({B, C}, opts) : at::empty({0}, opts);
  if (B * HW == 0) return {dx, da};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dcamkd_spool_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dim3 grid(cdiv(HW, 256), B);
    spool_bwd_kernel<scalar_t, acc_t><<<grid, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ga.data_ptr<acc_t>(), gm.data_ptr<acc_t>(), x.data_ptr<scalar_t>(),
        a.defined() ? a.data_ptr<acc_t>() : nullptr, m.data_ptr<acc_t>(), C, HW, L, dx.data_ptr<scalar_t>(),
        a.defined() ? da.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, da};
}

at::Tensor apply_gates(const at::Tensor& s, const std::optional<at::Tensor>& channel_gate,
                           const std::optional<at::Tensor>& spatial_gate) {
  check_cuda(s, "s");
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t C = s.size(1), HW = s.size(2) * s.size(3), N = s.numel();
  const Layout L = layout_of(s);
  const auto acc = acc_of(s);
  at::Tensor a = opt_acc2(channel_gate, acc), m = opt_acc2(spatial_gate, acc);
  at::Tensor out = at::empty_like(s);
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dcamkd_gate_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t blocks = std::min<int64_t>(cdiv(N, 256), 65535 * 8);
    gate_fwd_kernel<scalar_t, acc_t><<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.data_ptr<scalar_t>(), a.defined() ? a.data_ptr<acc_t>() : nullptr,
        m.defined() ? m.data_ptr<acc_t>() : nullptr, N, C, HW, L.sC == 1 && C > 1, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> apply_gates_backward(const at::Tensor& grad, const at::Tensor& s,
                                                               const std::optional<at::Tensor>& channel_gate,
                                                               const std::optional<at::Tensor>& spatial_gate) {
  check_cuda(s, "s");
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3), HW = H * W;
  const Layout L = layout_of(s);
  const auto acc = acc_of(s);
  at::Tensor a = opt_acc2(channel_gate, acc), m = opt_acc2(spatial_gate, acc);
  at::Tensor go = grad.to(s.scalar_type()).contiguous(s.suggest_memory_format());
  TORCH_CHECK(go.strides() == s.strides(), "dcamkd CUDA apply_gates_backward: grad layout differs from s");
  auto opts = s.options().dtype(acc);
  at::Tensor ds = at::empty_like(s);
  at::Tensor da = a.defined() ? at::zeros({B, C}, opts) : at::empty({0}, opts);
  at::Tensor dm = m.defined() ? at::empty({B, H, W}, opts) : at::empty({0}, opts);
  if (B * HW == 0) return {ds, da, dm};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dcamkd_gate_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dim3 grid(cdiv(HW, 256), B);
    gate_bwd_kernel<scalar_t, acc_t><<<grid, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        go.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), a.defined() ? a.data_ptr<acc_t>() : nullptr,
        m.defined() ? m.data_ptr<acc_t>() : nullptr, C, HW, L, ds.data_ptr<scalar_t>(),
        a.defined() ? da.data_ptr<acc_t>() : nullptr, m.defined() ? dm.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ds, da, dm};
}

TORCH_LIBRARY_IMPL(dcamkd, CUDA, m) {
  m.impl("channel_pool", &channel_pool);
  m.impl("channel_pool_backward", &channel_pool_backward);
  m.impl("spatial_pool", &spatial_pool);
  m.impl("spatial_pool_backward", &spatial_pool_backward);
  m.impl("apply_gates", &apply_gates);
  m.impl("apply_gates_backward", &apply_gates_backward);
}

}  // namespace dcamkd_cuda
