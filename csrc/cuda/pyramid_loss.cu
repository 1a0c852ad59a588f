// Fused pyramid distillation loss on CUDA: op dcamkd::pyramid_loss and its backward (schemas, fake
// implementations and autograd in dcamkd/ops/pyramid_loss.py, which also states the op contract;
// spec dcamkd/reference.py level_terms). The host functions run one level at a time.
//
// Forward:
//   * loc_stats_kernel (channel CD / channel KD, rows = locations): one thread per (b, p),
//     loop over channels (threads of a warp read consecutive p: coalesced in NCHW). Online
//     max/sum-exp for the KL. Writes |t|, |s'|, t.s' (+ the row's distance) and lse_t, lse_s, kl.
//   * row_stats_kernel (spatial CD / spatial KD, rows = (b, c)): one block per row, threads
//     stride over p, block reductions (log-sum-exp merge).
//   In the paper's configuration (channel CD + spatial KD) both run, so the forward reads T and S
//   twice (4 N e bytes); the Triton kernel reads them once (2 N e). See benchmarks/gpu_check.sh.
// Backward: grad_kernel, one thread per (b, p) looping over channels: reads T, S once, writes dS
//   (and dT), dm in registers, da by warp reduction + one atomicAdd per warp and channel.
// The gated student s' = a_c m_p s is formed in registers only.
#include "common.cuh"

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace dcamkd_cuda {

// kGlobal: the global cosine (per image, the whole flattened map). Its forward computes the
// channel-CD location rows; the host sums them per image, and the backward runs the channel path
// on rows replaced by the image's sums (so the per-location coefficients are the image's).
enum Mode : int64_t { kNone = 0, kChannel = 1, kSpatial = 2, kGlobal = 3 };

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dsqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dsqrt(double x) { return sqrt(x); }

// d = 0.5 (|t|^2/nt^2 + |g|^2/ng^2) - t.g/(nt ng), n = max(|x|, eps)
template <typename acc_t>
__device__ __forceinline__ acc_t cos_dist(acc_t nt_raw, acc_t ng_raw, acc_t tg, acc_t eps) {
  const acc_t nt = max(nt_raw, eps), ng = max(ng_raw, eps);
  const acc_t rt = nt_raw / nt, rg = ng_raw / ng;
  return acc_t(0.5) * (rt * rt + rg * rg) - tg / (nt * ng);
}

// Gradient coefficients: dd/dg = ag g + be t, dd/dt = at t + be g (autograd through clamp_min).
template <typename acc_t>
__device__ __forceinline__ void cos_coefs(acc_t nt_raw, acc_t ng_raw, acc_t tg, acc_t eps,
                                          acc_t& at, acc_t& ag, acc_t& be) {
  const acc_t nt = max(nt_raw, eps), ng = max(ng_raw, eps);
  const acc_t inv = acc_t(1) / (nt * ng);
  const acc_t flat = acc_t(1) / (eps * eps);
  at = nt_raw >= eps ? tg * inv / (nt * nt) : flat;
  ag = ng_raw >= eps ? tg * inv / (ng * ng) : flat;
  be = -inv;
}

template <typename scalar_t, typename acc_t>
__global__ void loc_stats_kernel(const scalar_t* __restrict__ t, const scalar_t* __restrict__ s,
                                 const acc_t* __restrict__ a, const acc_t* __restrict__ m,
                                 int64_t C, int64_t HW, Layout L, acc_t inv_tau, acc_t eps,
                                 int64_t n_rows, acc_t* __restrict__ cos_out,
                                 acc_t* __restrict__ d_out, acc_t* __restrict__ kl_out) {
  const int64_t b = blockIdx.y;
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= HW) return;
  const int64_t idx = b * HW + p;
  const int64_t base = b * C * HW + p * L.sP;
  const acc_t mv = m ? m[idx] : acc_t(1);
  const acc_t NEG = Neg<acc_t>::value();
  acc_t tt = 0, gg = 0, tg = 0, mt = NEG, zt = 0, mg = NEG, zg = 0, w = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t tv = static_cast<acc_t>(t[base + c * L.sC]);
    acc_t gv = static_cast<acc_t>(s[base + c * L.sC]);
    if (a) gv *= a[b * C + c];
    gv *= mv;
    if (cos_out) {
      tt += tv * tv;
      gg += gv * gv;
      tg += tv * gv;
    }
    if (kl_out) {
      const acc_t x = tv * inv_tau, y = gv * inv_tau;
      if (x > mt) {
        const acc_t r = dexp(mt - x);
        zt *= r;
        w *= r;
        mt = x;
      }
      const acc_t e = dexp(x - mt);
      zt += e;
      w += e * (x - y);
      if (y > mg) {
        zg *= dexp(mg - y);
        mg = y;
      }
      zg += dexp(y - mg);
    }
  }
  if (cos_out) {
    const acc_t nt = dsqrt(tt), ng = dsqrt(gg);
    cos_out[idx] = nt;
    cos_out[n_rows + idx] = ng;
    cos_out[2 * n_rows + idx] = tg;
    d_out[idx] = cos_dist(nt, ng, tg, eps);
  }
  if (kl_out) {
    const acc_t lt = mt + dlog(zt), lg = mg + dlog(zg);
    kl_out[idx] = lt;
    kl_out[n_rows + idx] = lg;
    kl_out[2 * n_rows + idx] = w / zt - lt + lg;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void row_stats_kernel(const scalar_t* __restrict__ t, const scalar_t* __restrict__ s,
                                 const acc_t* __restrict__ a, const acc_t* __restrict__ m,
                                 int64_t C, int64_t HW, Layout L, acc_t inv_tau, acc_t eps,
                                 int64_t n_rows, acc_t* __restrict__ cos_out,
                                 acc_t* __restrict__ d_out, acc_t* __restrict__ kl_out) {
  __shared__ acc_t sh[32];
  const int64_t r = blockIdx.x;  // b * C + c
  const int64_t b = r / C, c = r % C;
  const int64_t base = b * C * HW + c * L.sC;
  const acc_t av = a ? a[r] : acc_t(1);
  const acc_t NEG = Neg<acc_t>::value();
  acc_t tt = 0, gg = 0, tg = 0, mt = NEG, zt = 0, mg = NEG, zg = 0, w = 0;
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
    const acc_t tv = static_cast<acc_t>(t[base + p * L.sP]);
    acc_t gv = static_cast<acc_t>(s[base + p * L.sP]) * av;
    if (m) gv *= m[b * HW + p];
    if (cos_out) {
      tt += tv * tv;
      gg += gv * gv;
      tg += tv * gv;
    }
    if (kl_out) {
      const acc_t x = tv * inv_tau, y = gv * inv_tau;
      if (x > mt) {
        const acc_t q = dexp(mt - x);
        zt *= q;
        w *= q;
        mt = x;
      }
      const acc_t e = dexp(x - mt);
      zt += e;
      w += e * (x - y);
      if (y > mg) {
        zg *= dexp(mg - y);
        mg = y;
      }
      zg += dexp(y - mg);
    }
  }
  if (cos_out) {
    tt = block_sum(tt, sh);
    gg = block_sum(gg, sh);
    tg = block_sum(tg, sh);
    if (threadIdx.x == 0) {
      const acc_t nt = dsqrt(tt), ng = dsqrt(gg);
      cos_out[r] = nt;
      cos_out[n_rows + r] = ng;
      cos_out[2 * n_rows + r] = tg;
      d_out[r] = cos_dist(nt, ng, tg, eps);
    }
  }
  if (kl_out) {
    const acc_t Mt = block_max(mt, sh);
    const acc_t qt = dexp(mt - Mt);
    zt = block_sum(zt * qt, sh);
    w = block_sum(w * qt, sh);
    const acc_t Mg = block_max(mg, sh);
    zg = block_sum(zg * dexp(mg - Mg), sh);
    if (threadIdx.x == 0) {
      const acc_t lt = Mt + dlog(zt), lg = Mg + dlog(zg);
      kl_out[r] = lt;
      kl_out[n_rows + r] = lg;
      kl_out[2 * n_rows + r] = w / zt - lt + lg;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_kernel(const scalar_t* __restrict__ t, const scalar_t* __restrict__ s,
                            const acc_t* __restrict__ a, const acc_t* __restrict__ m,
                            const acc_t* __restrict__ wgt, const acc_t* __restrict__ cos_st,
                            const acc_t* __restrict__ kl_st, const acc_t* __restrict__ row_w,
                            int64_t cos_mode, int64_t kl_mode,
                            int64_t B, int64_t C, int64_t HW, Layout L, acc_t inv_tau, acc_t eps,
                            scalar_t* __restrict__ ds, scalar_t* __restrict__ dt,
                            acc_t* __restrict__ da, acc_t* __restrict__ dm) {
  const int64_t b = blockIdx.y;
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const bool valid = p < HW;
  const int64_t idx = b * HW + (valid ? p : 0);
  const int64_t base = b * C * HW + (valid ? p : 0) * L.sP;
  const acc_t gc = wgt[0], gk = wgt[1] * inv_tau;
  const int64_t nloc = B * HW, nrow = B * C;
  const acc_t mv = m ? m[idx] : acc_t(1);
  acc_t l_at = 0, l_ag = 0, l_be = 0, l_lt = 0, l_lg = 0, l_kl = 0;
  if (cos_mode == kChannel)
    cos_coefs(cos_st[idx], cos_st[nloc + idx], cos_st[2 * nloc + idx], eps, l_at, l_ag, l_be);
  if (kl_mode == kChannel) {
    l_lt = kl_st[idx];
    l_lg = kl_st[nloc + idx];
    l_kl = kl_st[2 * nloc + idx];
  }
  acc_t dm_acc = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t r = b * C + c;
    const int64_t off = base + c * L.sC;
    const acc_t tv = valid ? static_cast<acc_t>(t[off]) : acc_t(0);
    const acc_t sv = valid ? static_cast<acc_t>(s[off]) : acc_t(0);
    const acc_t av = a ? a[r] : acc_t(1);
    const acc_t gv = sv * av * mv;
    acc_t dg = 0, dtv = 0;
    if (cos_mode == kChannel) {  // row_w: mining weight of the location (dT is not mined)
      dg += gc * (row_w ? row_w[idx] : acc_t(1)) * (l_ag * gv + l_be * tv);
      dtv += gc * (l_at * tv + l_be * gv);
    } else if (cos_mode == kSpatial) {
      acc_t at, ag, be;
      cos_coefs(cos_st[r], cos_st[nrow + r], cos_st[2 * nrow + r], eps, at, ag, be);
      dg += gc * (ag * gv + be * tv);
      dtv += gc * (at * tv + be * gv);
    }
    if (kl_mode != kNone) {
      acc_t lt = l_lt, lg = l_lg, klr = l_kl;
      if (kl_mode == kSpatial) {
        lt = kl_st[r];
        lg = kl_st[nrow + r];
        klr = kl_st[2 * nrow + r];
      }
      const acc_t lp = tv * inv_tau - lt, lq = gv * inv_tau - lg;
      const acc_t pp = dexp(lp);
      dg += gk * (dexp(lq) - pp);
      dtv += gk * pp * (lp - lq - klr);
    }
    if (!valid) dg = 0;
    if (valid) {
      ds[off] = static_cast<scalar_t>(dg * av * mv);
      if (dt) dt[off] = static_cast<scalar_t>(dtv);
    }
    if (da) {  // warps never straddle two images: blockIdx.y is the image
      const acc_t v = warp_sum(dg * sv * mv);
      if ((threadIdx.x & 31) == 0) atomicAdd(da + r, v);
    }
    dm_acc += dg * sv * av;
  }
  if (dm && valid) dm[idx] = dm_acc;
}

// (3, B) per-image |t_b|, |s'_b|, t_b.s'_b of the global cosine from the (3, B, HW) location rows.
static at::Tensor global_rows(const at::Tensor& cos_rows, int64_t B, int64_t HW) {
  at::Tensor r = cos_rows.view({3, B, HW});
  return at::stack({r[0].square().sum(1).sqrt(), r[1].square().sum(1).sqrt(), r[2].sum(1)});
}

static at::Tensor opt_acc(const std::optional<at::Tensor>& g, at::ScalarType acc) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  return g->to(acc).contiguous();
}

template <typename T>
static const T* ptr_or_null(const at::Tensor& x) {
  return x.defined() ? x.data_ptr<T>() : nullptr;
}

// Returns (terms (2,), stats 1-D) in the accumulation dtype.
static std::tuple<at::Tensor, at::Tensor> level_forward(const at::Tensor& t, const at::Tensor& s,
                                                 const std::optional<at::Tensor>& channel_gate,
                                                 const std::optional<at::Tensor>& spatial_gate,
                                                 int64_t cos_mode, int64_t kl_mode, double tau,
                                                 bool sum_c, double eps) {
  check_cuda(t, "teacher");
  check_cuda(s, "student");
  TORCH_CHECK(t.sizes() == s.sizes() && t.scalar_type() == s.scalar_type(),
              "dcamkd CUDA pyramid_loss: teacher and student must agree in shape and dtype");
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t B = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  const Layout L = layout_of(t);
  TORCH_CHECK(layout_of(s).sC == L.sC, "dcamkd CUDA pyramid_loss: teacher and student layouts differ");
  const auto acc = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = t.options().dtype(acc);
  at::Tensor a = opt_acc(channel_gate, acc), m = opt_acc(spatial_gate, acc);
  const bool glob = cos_mode == kGlobal;
  if (glob) cos_mode = kChannel;  // location rows; the term is formed per image below
  const int64_t Rc = cos_mode == kChannel ? HW : C, Rk = kl_mode == kChannel ? HW : C;
  const int64_t ncos = cos_mode == kNone ? 0 : 3 * B * Rc, nkl = kl_mode == kNone ? 0 : 3 * B * Rk;
  at::Tensor stats = at::empty({ncos + nkl}, opts);
  at::Tensor d = at::empty({cos_mode == kNone ? 0 : B * Rc}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "dcamkd_pyramid_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* st = stats.data_ptr<acc_t>();
    acc_t* cos_p = cos_mode == kNone ? nullptr : st;
    acc_t* kl_p = kl_mode == kNone ? nullptr : st + ncos;
    const acc_t inv_tau = acc_t(1.0 / tau), e = acc_t(eps);
    const int threads = 256;
    if (cos_mode == kChannel || kl_mode == kChannel) {
      dim3 grid(cdiv(HW, threads), B);
      loc_stats_kernel<scalar_t, acc_t><<<grid, threads, 0, stream>>>(
          t.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), ptr_or_null<acc_t>(a), ptr_or_null<acc_t>(m),
          C, HW, L, inv_tau, e, B * HW, cos_mode == kChannel ? cos_p : nullptr,
          cos_mode == kChannel ? d.data_ptr<acc_t>() : nullptr, kl_mode == kChannel ? kl_p : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (cos_mode == kSpatial || kl_mode == kSpatial) {
      row_stats_kernel<scalar_t, acc_t><<<B * C, threads, 0, stream>>>(
          t.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), ptr_or_null<acc_t>(a), ptr_or_null<acc_t>(m),
          C, HW, L, inv_tau, e, B * C, cos_mode == kSpatial ? cos_p : nullptr,
          cos_mode == kSpatial ? d.data_ptr<acc_t>() : nullptr, kl_mode == kSpatial ? kl_p : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  at::Tensor zero = at::zeros({}, opts);
  at::Tensor c_term = cos_mode == kNone ? zero : d.sum() / static_cast<double>(B * Rc);
  if (glob) {
    at::Tensor g = global_rows(stats.narrow(0, 0, ncos), B, HW);  // (3, B)
    at::Tensor nt = g[0].clamp_min(eps), ng = g[1].clamp_min(eps);
    at::Tensor dg = 0.5 * ((g[0] / nt).square() + (g[1] / ng).square()) - g[2] / (nt * ng);
    c_term = dg.sum() / static_cast<double>(B);
  }
  at::Tensor k_term = zero;
  if (kl_mode != kNone) {
    const double n = (kl_mode == kSpatial && sum_c) ? B : B * Rk;
    k_term = stats.narrow(0, ncos + 2 * B * Rk, B * Rk).sum() / n;
  }
  return {at::stack({c_term, k_term}), stats};
}

// Returns {ds, dt (undefined unless need_t), da ((B, C) or (0,)), dm ((B, H, W) or (0,))}.
static std::vector<at::Tensor> level_backward(const at::Tensor& grad2, const at::Tensor& t, const at::Tensor& s,
                                       const std::optional<at::Tensor>& channel_gate,
                                       const std::optional<at::Tensor>& spatial_gate,
                                       const at::Tensor& stats, const at::Tensor& row_w, int64_t cos_mode,
                                       int64_t kl_mode, double tau, bool sum_c, double eps, bool need_t) {
  check_cuda(t, "teacher");
  check_cuda(s, "student");
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t B = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3), HW = H * W;
  const Layout L = layout_of(t);
  const auto acc = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = t.options().dtype(acc);
  at::Tensor a = opt_acc(channel_gate, acc), m = opt_acc(spatial_gate, acc);
  const bool glob = cos_mode == kGlobal;
  if (glob) cos_mode = kChannel;
  const int64_t Rc = cos_mode == kChannel ? HW : C, Rk = kl_mode == kChannel ? HW : C;
  const int64_t ncos = cos_mode == kNone ? 0 : 3 * B * Rc;
  const double n_cos = cos_mode == kNone ? 1.0 : (glob ? double(B) : double(B * Rc));
  TORCH_CHECK(row_w.numel() == 0 || (row_w.numel() == B * HW && cos_mode == kChannel && row_w.is_contiguous() &&
                                     row_w.scalar_type() == acc && row_w.is_cuda()),
              "dcamkd CUDA pyramid_loss_backward: row_weights must be empty or B*H*W contiguous weights");
  const double n_kl = kl_mode == kNone ? 1.0 : ((kl_mode == kSpatial && sum_c) ? double(B) : double(B * Rk));
  at::Tensor g2 = grad2.to(acc).reshape({2});
  at::Tensor wgt = at::stack({g2[0] / n_cos, g2[1] / n_kl}).contiguous();
  at::Tensor ds = at::empty_like(s);
  at::Tensor dt = need_t ? at::empty_like(t) : at::Tensor();
  at::Tensor da = a.defined() ? at::zeros({B, C}, opts) : at::empty({0}, opts);
  at::Tensor dm = m.defined() ? at::empty({B, H, W}, opts) : at::empty({0}, opts);
  at::Tensor st = stats.contiguous();
  if (glob) {  // every location row of image b holds the image's sums: the coefficients are b's
    st = st.clone();
    at::Tensor g = global_rows(st.narrow(0, 0, ncos), B, HW);
    st.narrow(0, 0, ncos).view({3, B, HW}).copy_(g.unsqueeze(2).expand({3, B, HW}));
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "dcamkd_pyramid_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* sp = st.data_ptr<acc_t>();
    const int threads = 256;
    dim3 grid(cdiv(HW, threads), B);
    grad_kernel<scalar_t, acc_t><<<grid, threads, 0, stream>>>(
        t.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), ptr_or_null<acc_t>(a), ptr_or_null<acc_t>(m),
        wgt.data_ptr<acc_t>(), cos_mode == kNone ? nullptr : sp, kl_mode == kNone ? nullptr : sp + ncos,
        row_w.numel() ? row_w.data_ptr<acc_t>() : nullptr, cos_mode, kl_mode, B, C, HW, L, acc_t(1.0 / tau), acc_t(eps), ds.data_ptr<scalar_t>(),
        need_t ? dt.data_ptr<scalar_t>() : nullptr, a.defined() ? da.data_ptr<acc_t>() : nullptr,
        m.defined() ? dm.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ds, dt, da, dm};
}

static int64_t mode_code(c10::string_view m, const char* what) {
  if (m == "none") return kNone;
  if (m == "channel") return kChannel;
  if (m == "global" && std::string(what) == "cos") return kGlobal;
  TORCH_CHECK(m == "spatial", "dcamkd CUDA pyramid_loss: ", what, " must be channel|spatial|none (cos: or global), got ", m);
  return kSpatial;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> pyramid_loss(
    at::TensorList T, at::TensorList S, at::TensorList CG, at::TensorList SG, c10::string_view cos,
    c10::string_view kl, double tau, c10::string_view red, double eps, c10::string_view /*mine*/,
    double /*mine_factor*/, const at::Tensor& /*mine_level: used by the autograd formula only*/) {
  const size_t n = S.size();
  TORCH_CHECK(n > 0 && T.size() == n && CG.size() == n && SG.size() == n,
              "dcamkd CUDA pyramid_loss: pyramid lists must be non-empty and of equal length");
  const int64_t cm = mode_code(cos, "cos"), km = mode_code(kl, "kl");
  std::vector<at::Tensor> terms, stats;
  for (size_t l = 0; l < n; ++l) {
    auto [tr, st] = level_forward(T[l], S[l], gate_or_none(CG[l]), gate_or_none(SG[l]), cm, km, tau,
                                  red == "sum_c", eps);
    terms.push_back(tr);
    stats.push_back(st);
  }
  return {at::stack(terms), stats};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
pyramid_loss_backward(const at::Tensor& grad_terms, at::TensorList T, at::TensorList S, at::TensorList CG,
                      at::TensorList SG, at::TensorList stats, at::TensorList row_weights, c10::string_view cos,
                      c10::string_view kl, double tau, c10::string_view red, double eps, bool teacher_grad) {
  const size_t n = S.size();
  TORCH_CHECK(n > 0 && T.size() == n && CG.size() == n && SG.size() == n && stats.size() == n &&
                  row_weights.size() == n,
              "dcamkd CUDA pyramid_loss_backward: lists of unequal length");
  const int64_t cm = mode_code(cos, "cos"), km = mode_code(kl, "kl");
  std::vector<at::Tensor> gs, gt, ga, gm;
  for (size_t l = 0; l < n; ++l) {
    auto g = level_backward(grad_terms[l], T[l], S[l], gate_or_none(CG[l]), gate_or_none(SG[l]), stats[l],
                            row_weights[l], cm, km, tau, red == "sum_c", eps, teacher_grad);
    gs.push_back(g[0]);
    if (teacher_grad) gt.push_back(g[1]);
    ga.push_back(g[2]);
    gm.push_back(g[3]);
  }
  return {gs, gt, ga, gm};
}

TORCH_LIBRARY_IMPL(dcamkd, CUDA, m) {
  m.impl("pyramid_loss", &pyramid_loss);
  m.impl("pyramid_loss_backward", &pyramid_loss_backward);
}

}  // namespace dcamkd_cuda
