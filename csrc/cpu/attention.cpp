// DCAM attention pieces on the CPU: ops dcamkd::channel_pool, dcamkd::spatial_pool,
// dcamkd::apply_gates and their backward ops (schemas, fake implementations and autograd in
// dcamkd/ops/attention.py; spec dcamkd/reference.py channel_pool, spatial_pool, apply_gates).
// Average+max pooling in one read (channel and spatial variants, the spatial one taking the
// channel gate, for cbam) and the gating multiply, with backward. Same (NO, NI) slab view as
// slab.h: NCHW -> (C, HW), channels_last -> (HW, C). A NaN in a pooled row gives a NaN mean and
// max (max_with_nan), as torch.amax does.
#include "common.h"

namespace dcamkd {
namespace {

// avg/max of v = x * gO[o] * gI[i] along the inner (OVER_INNER) or the outer axis.
template <typename scalar_t, bool OVER_INNER>
void pool_fwd(const scalar_t* X, const typename AccT<scalar_t>::type* gO, const typename AccT<scalar_t>::type* gI,
              int64_t B, int64_t NO, int64_t NI, typename AccT<scalar_t>::type* avg,
              typename AccT<scalar_t>::type* mx) {
  using A = typename AccT<scalar_t>::type;
  const A NEG = -std::numeric_limits<A>::infinity();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> ones(std::max(NO, NI), A(1)), bs, bm;
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* x = X + b * NO * NI;
      const A* go = gO ? gO + b * NO : ones.data();
      const A* gi = gI ? gI + b * NI : ones.data();
      if (OVER_INNER) {
        for (int64_t o = 0; o < NO; ++o) {
          const scalar_t* xo = x + o * NI;
          const A g = go[o];
          A sm = 0, m = NEG;
#pragma omp simd reduction(+ : sm) reduction(max : m)
          for (int64_t i = 0; i < NI; ++i) {
            A v = A(xo[i]) * g * gi[i];
            sm += v;
            m = v > m ? v : m;
          }
          avg[b * NO + o] = sm / A(NI);
          mx[b * NO + o] = max_with_nan(m, sm);
        }
      } else {
        bs.assign(NI, A(0));
        bm.assign(NI, NEG);
        A* ps = bs.data(); A* pm = bm.data();
        for (int64_t o = 0; o < NO; ++o) {
          const scalar_t* xo = x + o * NI;
          const A g = go[o];
#pragma omp simd
          for (int64_t i = 0; i < NI; ++i) {
            A v = A(xo[i]) * g * gi[i];
            ps[i] += v;
            pm[i] = v > pm[i] ? v : pm[i];
          }
        }
        for (int64_t i = 0; i < NI; ++i) {
          avg[b * NI + i] = ps[i] / A(NO);
          mx[b * NI + i] = max_with_nan(pm[i], ps[i]);
        }
      }
    }
  });
}

// Backward of pool_fwd: dv = gavg / n + gmax * [v == max] / count(ties); dx = dv * gO * gI;
// d gO[o] = sum_i dv x gI[i]; d gI[i] = sum_o dv x gO[o].
template <typename scalar_t, bool OVER_INNER>
void pool_bwd(const typename AccT<scalar_t>::type* GA, const typename AccT<scalar_t>::type* GM, const scalar_t* X,
              const typename AccT<scalar_t>::type* gO, const typename AccT<scalar_t>::type* gI,
              const typename AccT<scalar_t>::type* MX, int64_t B, int64_t NO, int64_t NI, scalar_t* DX,
              typename AccT<scalar_t>::type* dgO, typename AccT<scalar_t>::type* dgI) {
  using A = typename AccT<scalar_t>::type;
  const int64_t R = OVER_INNER ? NO : NI;
  const A inv_n = A(1) / A(OVER_INNER ? NI : NO);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> ones(std::max(NO, NI), A(1)), cnt, ca, cm, dgi;
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* x = X + b * NO * NI;
      scalar_t* dx = DX + b * NO * NI;
      const A* go = gO ? gO + b * NO : ones.data();
      const A* gi = gI ? gI + b * NI : ones.data();
      const A* mxb = MX + b * R;
      cnt.assign(R, A(0));
      A* pc = cnt.data();
      for (int64_t o = 0; o < NO; ++o) {  // tie counts
        const scalar_t* xo = x + o * NI;
        const A g = go[o];
        if (OVER_INNER) {
          A c = 0;
          const A m = mxb[o];
#pragma omp simd reduction(+ : c)
          for (int64_t i = 0; i < NI; ++i) c += (A(xo[i]) * g * gi[i] == m) ? A(1) : A(0);
          pc[o] = c;
        } else {
#pragma omp simd
          for (int64_t i = 0; i < NI; ++i) pc[i] += (A(xo[i]) * g * gi[i] == mxb[i]) ? A(1) : A(0);
        }
      }
      ca.resize(R); cm.resize(R);
      for (int64_t r = 0; r < R; ++r) {
        ca[r] = GA[b * R + r] * inv_n;
        cm[r] = pc[r] > 0 ? GM[b * R + r] / pc[r] : A(0);
      }
      dgi.assign(NI, A(0));
      A* pdgi = dgi.data();
      const A* pca = ca.data(); const A* pcm = cm.data();
      for (int64_t o = 0; o < NO; ++o) {
        const scalar_t* xo = x + o * NI;
        scalar_t* dxo = dx + o * NI;
        const A g = go[o];
        A dgo = 0;
#pragma omp simd reduction(+ : dgo)
        for (int64_t i = 0; i < NI; ++i) {
          const A xv = A(xo[i]), gii = gi[i];
          const A v = xv * g * gii;
          const int64_t r = OVER_INNER ? o : i;
          const A m = mxb[r];
          const A dv = pca[r] + (v == m ? pcm[r] : A(0));
          dxo[i] = static_cast<scalar_t>(dv * g * gii);
          dgo += dv * xv * gii;
          pdgi[i] += dv * xv * g;
        }
        if (dgO) dgO[b * NO + o] = dgo;
      }
      if (dgI) std::memcpy(dgI + b * NI, pdgi, sizeof(A) * NI);
    }
  });
}

template <typename scalar_t>
void gates_fwd(const scalar_t* S, const typename AccT<scalar_t>::type* gO, const typename AccT<scalar_t>::type* gI,
               int64_t B, int64_t NO, int64_t NI, scalar_t* OUT) {
  using A = typename AccT<scalar_t>::type;
  at::parallel_for(0, B * NO, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / NO, o = r % NO;
      const scalar_t* so = S + r * NI;
      scalar_t* out = OUT + r * NI;
      const A g = gO ? gO[r] : A(1);
      if (gI) {
        const A* gi = gI + b * NI;
#pragma omp simd
        for (int64_t i = 0; i < NI; ++i) out[i] = static_cast<scalar_t>(A(so[i]) * g * gi[i]);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < NI; ++i) out[i] = static_cast<scalar_t>(A(so[i]) * g);
      }
      (void)o;
    }
  });
}

template <typename scalar_t>
void gates_bwd(const scalar_t* G, const scalar_t* S, const typename AccT<scalar_t>::type* gO,
               const typename AccT<scalar_t>::type* gI, int64_t B, int64_t NO, int64_t NI, scalar_t* DS,
               typename AccT<scalar_t>::type* dgO, typename AccT<scalar_t>::type* dgI) {
  using A = typename AccT<scalar_t>::type;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> ones(std::max(NO, NI), A(1)), dgi;
    for (int64_t b = b0; b < b1; ++b) {
      const A* go = gO ? gO + b * NO : ones.data();
      const A* gi = gI ? gI + b * NI : ones.data();
      dgi.assign(NI, A(0));
      A* pdgi = dgi.data();
      for (int64_t o = 0; o < NO; ++o) {
        const int64_t off = (b * NO + o) * NI;
        const scalar_t* go_ = G + off; const scalar_t* so = S + off;
        scalar_t* dso = DS + off;
        const A g = go[o];
        A dgo = 0;
#pragma omp simd reduction(+ : dgo)
        for (int64_t i = 0; i < NI; ++i) {
          const A gv = A(go_[i]), sv = A(so[i]), gii = gi[i];
          dso[i] = static_cast<scalar_t>(gv * g * gii);
          dgo += gv * sv * gii;
          pdgi[i] += gv * sv * g;
        }
        if (dgO) dgO[b * NO + o] = dgo;
      }
      if (dgI) std::memcpy(dgI + b * NI, pdgi, sizeof(A) * NI);
    }
  });
}

struct View {
  int64_t B, C, HW, NO, NI;
  bool cl;
};

View view(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "dcamkd: expected a (B, C, H, W) tensor");
  View v;
  v.B = x.size(0); v.C = x.size(1); v.HW = x.size(2) * x.size(3);
  v.cl = is_cl(x);
  v.NO = v.cl ? v.HW : v.C;
  v.NI = v.cl ? v.C : v.HW;
  return v;
}

template <typename A>
const A* ptr(const std::optional<at::Tensor>& x) { return x.has_value() ? x->data_ptr<A>() : nullptr; }

std::tuple<at::Tensor, at::Tensor> channel_pool(const at::Tensor& x) {
  View v = view(x);
  auto o = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor avg = at::empty({v.B, v.C}, o), mx = at::empty({v.B, v.C}, o);
  DCAMKD_DISPATCH(x.scalar_type(), "dcamkd_channel_pool", [&] {
    using A = typename AccT<scalar_t>::type;
    if (v.cl) pool_fwd<scalar_t, false>(x.data_ptr<scalar_t>(), nullptr, nullptr, v.B, v.NO, v.NI, avg.data_ptr<A>(), mx.data_ptr<A>());
    else pool_fwd<scalar_t, true>(x.data_ptr<scalar_t>(), nullptr, nullptr, v.B, v.NO, v.NI, avg.data_ptr<A>(), mx.data_ptr<A>());
  });
  return {avg, mx};
}

at::Tensor channel_pool_backward(const at::Tensor& ga, const at::Tensor& gm, const at::Tensor& x, const at::Tensor& mx) {
  View v = view(x);
  at::Tensor dx = at::empty_like(x);
  DCAMKD_DISPATCH(x.scalar_type(), "dcamkd_channel_pool_bwd", [&] {
    using A = typename AccT<scalar_t>::type;
    auto gac = ga.contiguous(), gmc = gm.contiguous(), mxc = mx.contiguous();
    if (v.cl) pool_bwd<scalar_t, false>(gac.data_ptr<A>(), gmc.data_ptr<A>(), x.data_ptr<scalar_t>(), nullptr, nullptr, mxc.data_ptr<A>(), v.B, v.NO, v.NI, dx.data_ptr<scalar_t>(), nullptr, nullptr);
    else pool_bwd<scalar_t, true>(gac.data_ptr<A>(), gmc.data_ptr<A>(), x.data_ptr<scalar_t>(), nullptr, nullptr, mxc.data_ptr<A>(), v.B, v.NO, v.NI, dx.data_ptr<scalar_t>(), nullptr, nullptr);
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor> spatial_pool(const at::Tensor& x, const std::optional<at::Tensor>& a) {
  View v = view(x);
  auto o = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor avg = at::empty({v.B, x.size(2), x.size(3)}, o), mx = at::empty({v.B, x.size(2), x.size(3)}, o);
  DCAMKD_DISPATCH(x.scalar_type(), "dcamkd_spatial_pool", [&] {
    using A = typename AccT<scalar_t>::type;
    const A* pa = ptr<A>(a);
    if (v.cl) pool_fwd<scalar_t, true>(x.data_ptr<scalar_t>(), nullptr, pa, v.B, v.NO, v.NI, avg.data_ptr<A>(), mx.data_ptr<A>());
    else pool_fwd<scalar_t, false>(x.data_ptr<scalar_t>(), pa, nullptr, v.B, v.NO, v.NI, avg.data_ptr<A>(), mx.data_ptr<A>());
  });
  return {avg, mx};
}

std::tuple<at::Tensor, at::Tensor> spatial_pool_backward(const at::Tensor& ga, const at::Tensor& gm, const at::Tensor& x,
                                                         const std::optional<at::Tensor>& a, const at::Tensor& mx) {
  View v = view(x);
  at::Tensor dx = at::empty_like(x);
  at::Tensor da = a.has_value() ? at::empty_like(*a) : at::empty({0}, x.options().dtype(acc_type(x.scalar_type())));
  DCAMKD_DISPATCH(x.scalar_type(), "dcamkd_spatial_pool_bwd", [&] {
    using A = typename AccT<scalar_t>::type;
    const A* pa = ptr<A>(a);
    A* pda = a.has_value() ? da.data_ptr<A>() : nullptr;
    auto gac = ga.contiguous(), gmc = gm.contiguous(), mxc = mx.contiguous();
    if (v.cl) pool_bwd<scalar_t, true>(gac.data_ptr<A>(), gmc.data_ptr<A>(), x.data_ptr<scalar_t>(), nullptr, pa, mxc.data_ptr<A>(), v.B, v.NO, v.NI, dx.data_ptr<scalar_t>(), nullptr, pda);
    else pool_bwd<scalar_t, false>(gac.data_ptr<A>(), gmc.data_ptr<A>(), x.data_ptr<scalar_t>(), pa, nullptr, mxc.data_ptr<A>(), v.B, v.NO, v.NI, dx.data_ptr<scalar_t>(), pda, nullptr);
  });
  return {dx, da};
}

at::Tensor apply_gates(const at::Tensor& s, const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& m) {
  View v = view(s);
  at::Tensor out = at::empty_like(s);
  TORCH_CHECK(is_cl(out) == v.cl, "dcamkd: output layout differs from the input's");
  DCAMKD_DISPATCH(s.scalar_type(), "dcamkd_apply_gates", [&] {
    using A = typename AccT<scalar_t>::type;
    const A* pa = ptr<A>(a); const A* pm = ptr<A>(m);
    gates_fwd<scalar_t>(s.data_ptr<scalar_t>(), v.cl ? pm : pa, v.cl ? pa : pm, v.B, v.NO, v.NI, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> apply_gates_backward(const at::Tensor& grad, const at::Tensor& s,
                                                                    const std::optional<at::Tensor>& a,
                                                                    const std::optional<at::Tensor>& m) {
  View v = view(s);
  at::Tensor g = v.cl ? grad.contiguous(at::MemoryFormat::ChannelsLast) : grad.contiguous();
  auto acc = s.options().dtype(acc_type(s.scalar_type()));
  at::Tensor ds = at::empty_like(s);
  at::Tensor da = a.has_value() ? at::empty_like(*a) : at::empty({0}, acc);
  at::Tensor dm = m.has_value() ? at::empty_like(*m) : at::empty({0}, acc);
  DCAMKD_DISPATCH(s.scalar_type(), "dcamkd_apply_gates_bwd", [&] {
    using A = typename AccT<scalar_t>::type;
    const A* pa = ptr<A>(a); const A* pm = ptr<A>(m);
    A* pda = a.has_value() ? da.data_ptr<A>() : nullptr;
    A* pdm = m.has_value() ? dm.data_ptr<A>() : nullptr;
    gates_bwd<scalar_t>(g.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), v.cl ? pm : pa, v.cl ? pa : pm, v.B, v.NO,
                        v.NI, ds.data_ptr<scalar_t>(), v.cl ? pdm : pda, v.cl ? pda : pdm);
  });
  return {ds, da, dm};
}

TORCH_LIBRARY_IMPL(dcamkd, CPU, m) {
  m.impl("channel_pool", &channel_pool);
  m.impl("channel_pool_backward", &channel_pool_backward);
  m.impl("spatial_pool", &spatial_pool);
  m.impl("spatial_pool_backward", &spatial_pool_backward);
  m.impl("apply_gates", &apply_gates);
  m.impl("apply_gates_backward", &apply_gates_backward);
}

}  // namespace
}  // namespace dcamkd
