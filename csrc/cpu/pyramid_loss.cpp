// Fused pyramid distillation loss on the CPU: op dcamkd::pyramid_loss and its backward (schemas,
// fake implementations and autograd in dcamkd/ops/pyramid_loss.py; spec dcamkd/reference.py
// pyramid_terms). The cosine term and the KL term of every level, DCAM gates inside: the forward
// reads T and S once (slab::slab_fwd, csrc/cpu/slab.h) and saves per-row statistics; the backward
// reads T and S once more and writes dS (and dT), forming the gate gradients in the same pass.
#include "slab.h"

namespace dcamkd {
namespace {

using slab::Level;

// Backward of one level: one read of T and S, one write of dS (and dT), gate grads formed in the
// same pass. gc / gk: grad_output of the cos / kl term times its mean factor. Items (b, k) as in
// the forward; the inner-axis gate gradient is summed over the items of each b afterwards.
// gco: per-image cosine rows (|t_b|, |s'_b|, t_b.s'_b) of the global cosine, or null (row
// coefficients from cst). cw: per-row weights of the cosine part of dL/ds' (mining), or null.
template <typename scalar_t, int CR, int KR, bool TG>
void slab_bwd(const scalar_t* T, const scalar_t* S, const typename AccT<scalar_t>::type* gO,
              const typename AccT<scalar_t>::type* gI, int64_t B, int64_t NO, int64_t NI,
              typename AccT<scalar_t>::type itau, typename AccT<scalar_t>::type eps,
              const typename AccT<scalar_t>::type* cst, const typename AccT<scalar_t>::type* kst,
              typename AccT<scalar_t>::type gc, typename AccT<scalar_t>::type gk,
              const typename AccT<scalar_t>::type* gco, const typename AccT<scalar_t>::type* cw, scalar_t* dS,
              scalar_t* dT, typename AccT<scalar_t>::type* dgO, typename AccT<scalar_t>::type* dgI) {
  using A = typename AccT<scalar_t>::type;
  const int64_t RC = CR == R_INNER ? NO : NI, RK = KR == R_INNER ? NO : NI;
  const int64_t nblk = slab::n_blocks(B, NO, NI), bs = (NO + nblk - 1) / nblk;
  std::vector<A> part_dgi(dgI ? size_t(B * nblk * NI) : 0);
  const std::vector<A> ones(std::max(NO, NI), A(1));
  at::parallel_for(0, B * nblk, slab::grain(B, NO, NI, nblk), [&](int64_t j0, int64_t j1) {
    std::vector<A> cas, cat, cbb, cbs, klt, kls, kkv, dgi_scratch;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / nblk, k = j % nblk;
      const int64_t o0 = k * bs, o1 = std::min(NO, o0 + bs);
      const int64_t off = b * NO * NI;
      const scalar_t* t = T + off; const scalar_t* s = S + off;
      scalar_t* ds = dS + off;
      scalar_t* dt = TG ? dT + off : nullptr;
      const A* go = gO ? gO + b * NO : ones.data();
      const A* gi = gI ? gI + b * NI : ones.data();
      slab::CosCoef<A> cb{0, 0, 0};
      if (gco) cb = slab::cos_coef<A>(gco[3 * b], gco[3 * b + 1], gco[3 * b + 2], eps);
      if (CR == R_OUTER) {
        cas.resize(NI); cbs.resize(NI);
        if (TG) { cat.resize(NI); cbb.resize(NI); }
        for (int64_t i = 0; i < NI; ++i) {
          auto c = gco ? cb : slab::cos_coef<A>(cst[b * RC + i], cst[B * RC + b * RC + i], cst[2 * B * RC + b * RC + i], eps);
          const A wv = cw ? cw[b * RC + i] : A(1);
          cas[i] = gc * c.as * wv; cbs[i] = gc * c.bb * wv;
          if (TG) { cat[i] = gc * c.at; cbb[i] = gc * c.bb; }
        }
      }
      if (KR == R_OUTER) {
        klt.assign(kst + b * RK, kst + b * RK + NI);
        kls.assign(kst + B * RK + b * RK, kst + B * RK + b * RK + NI);
        kkv.assign(kst + 2 * B * RK + b * RK, kst + 2 * B * RK + b * RK + NI);
      }
      A* pdgi;
      if (dgI) {
        pdgi = part_dgi.data() + j * NI;
      } else {
        dgi_scratch.resize(NI);
        pdgi = dgi_scratch.data();
      }
      std::fill(pdgi, pdgi + NI, A(0));
      const A* pas = cas.data(); const A* pat = cat.data(); const A* pbb = cbb.data(); const A* pbs = cbs.data();
      const A* plt = klt.data(); const A* pls = kls.data(); const A* pkv = kkv.data();
      for (int64_t o = o0; o < o1; ++o) {
        const scalar_t* to = t + o * NI; const scalar_t* so = s + o * NI;
        scalar_t* dso = ds + o * NI;
        scalar_t* dto = TG ? dt + o * NI : nullptr;
        const A g = go[o];
        A ras = 0, rat = 0, rbb = 0, rbs = 0, rlt = 0, rls = 0, rkv = 0;
        if constexpr (CR == R_INNER) {
          auto c = gco ? cb : slab::cos_coef<A>(cst[b * RC + o], cst[B * RC + b * RC + o], cst[2 * B * RC + b * RC + o], eps);
          const A wv = cw ? cw[b * RC + o] : A(1);
          ras = gc * c.as * wv; rat = gc * c.at; rbb = gc * c.bb; rbs = gc * c.bb * wv;
        }
        if constexpr (KR == R_INNER) {
          rlt = kst[b * RK + o]; rls = kst[B * RK + b * RK + o]; rkv = kst[2 * B * RK + b * RK + o];
        }
        A dgo = 0;
#pragma omp simd reduction(+ : dgo)
        for (int64_t i = 0; i < NI; ++i) {
          const A tv = A(to[i]), sr = A(so[i]), gii = gi[i];
          const A sv = sr * g * gii;
          A gs = 0, gt = 0;
          if constexpr (CR == R_INNER) { gs += ras * sv + rbs * tv; if constexpr (TG) gt += rat * tv + rbb * sv; }
          if constexpr (CR == R_OUTER) { gs += pas[i] * sv + pbs[i] * tv; if constexpr (TG) gt += pat[i] * tv + pbb[i] * sv; }
          if constexpr (KR != R_NONE) {
            const A lt = KR == R_INNER ? rlt : plt[i];
            const A ls = KR == R_INNER ? rls : pls[i];
            const A kv = KR == R_INNER ? rkv : pkv[i];
            const A p = vexp(tv * itau - lt), q = vexp(sv * itau - ls);
            gs += gk * itau * (q - p);
            gt += gk * itau * p * ((tv - sv) * itau - lt + ls - kv);
          }
          dso[i] = static_cast<scalar_t>(gs * g * gii);
          if constexpr (TG) dto[i] = static_cast<scalar_t>(gt);
          dgo += gs * sr * gii;
          pdgi[i] += gs * sr * g;
        }
        if (dgO) dgO[b * NO + o] = dgo;
      }
    }
  });
  if (dgI) {
    for (int64_t b = 0; b < B; ++b) {
      A* out = dgI + b * NI;
      std::memcpy(out, part_dgi.data() + b * nblk * NI, sizeof(A) * NI);
      for (int64_t k = 1; k < nblk; ++k) {
        const A* pp = part_dgi.data() + (b * nblk + k) * NI;
#pragma omp simd
        for (int64_t i = 0; i < NI; ++i) out[i] += pp[i];
      }
    }
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> pyramid_loss(
    at::TensorList T, at::TensorList S, at::TensorList CG, at::TensorList SG, c10::string_view cos,
    c10::string_view kl, double tau, c10::string_view red, double eps, c10::string_view /*mine*/,
    double /*mine_factor*/, const at::Tensor& /*mine_level: used by the autograd formula only*/) {
  const int64_t n = static_cast<int64_t>(S.size());
  TORCH_CHECK(n > 0 && T.size() == S.size() && CG.size() == S.size() && SG.size() == S.size(),
              "dcamkd: pyramid lists must be non-empty and of equal length");
  auto acc = acc_type(S[0].scalar_type());
  at::Tensor terms = at::zeros({n, 2}, S[0].options().dtype(acc));
  std::vector<at::Tensor> stats;
  for (int64_t l = 0; l < n; ++l) {
    Level L = slab::describe(T[l], S[l], cos, kl, red);
    at::Tensor st = at::empty({3 * L.B * L.RC + 3 * L.B * L.RK}, S[l].options().dtype(acc));
    const at::Tensor* a = gate_or_null(CG[l]);
    const at::Tensor* m = gate_or_null(SG[l]);
    const at::Tensor* gOt = L.cl ? m : a;
    const at::Tensor* gIt = L.cl ? a : m;
    double cs = 0, ks = 0;
    DCAMKD_DISPATCH(S[l].scalar_type(), "dcamkd_pyramid_loss_fwd", [&] {
      using A = typename AccT<scalar_t>::type;
      const A* gO = gOt ? gOt->data_ptr<A>() : nullptr;
      const A* gI = gIt ? gIt->data_ptr<A>() : nullptr;
      A* cst = st.data_ptr<A>();
      A* kst = cst + 3 * L.B * L.RC;
      dispatch_red2(L.cr, L.kr, [&](auto cr, auto kr) {
        slab::slab_fwd<scalar_t, decltype(cr)::value, decltype(kr)::value>(
            T[l].data_ptr<scalar_t>(), S[l].data_ptr<scalar_t>(), gO, gI, L.B, L.NO, L.NI,
            A(1.0 / tau), A(eps), cst, kst);
      });
      if (L.cos_global) {  // the per-image rows from the location rows, then the per-image distances
        std::vector<A> g(3 * L.B);
        slab::global_rows<A>(cst, L.B, L.RC, g.data());
        double gsum = 0;
        for (int64_t b = 0; b < L.B; ++b) gsum += slab::cos_value(g[3 * b] * g[3 * b], g[3 * b + 1] * g[3 * b + 1], g[3 * b + 2], A(eps));
        std::tie(std::ignore, ks) = slab::stat_sums<A>(cst, kst, 0, L.B * L.RK, A(eps));
        cs = gsum;
      } else {
        std::tie(cs, ks) = slab::stat_sums<A>(cst, kst, L.B * L.RC, L.B * L.RK, A(eps));
      }
    });
    terms[l][0].fill_(cs * L.cos_scale);
    terms[l][1].fill_(ks * L.kl_scale);
    stats.push_back(st);
  }
  return {terms, stats};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
pyramid_loss_backward(const at::Tensor& grad_terms, at::TensorList T, at::TensorList S, at::TensorList CG,
                      at::TensorList SG, at::TensorList stats, at::TensorList row_weights, c10::string_view cos,
                      c10::string_view kl, double tau, c10::string_view red, double eps, bool teacher_grad) {
  const int64_t n = static_cast<int64_t>(S.size());
  TORCH_CHECK(n > 0 && T.size() == S.size() && CG.size() == S.size() && SG.size() == S.size() &&
                  stats.size() == S.size() && row_weights.size() == S.size() && grad_terms.numel() == 2 * n,
              "dcamkd: pyramid_loss_backward got lists of unequal length");
  auto acc = acc_type(S[0].scalar_type());
  at::Tensor gterm = grad_terms.to(at::kDouble).contiguous();
  const double* gp = gterm.data_ptr<double>();
  std::vector<at::Tensor> gS, gT, gA, gM;
  for (int64_t l = 0; l < n; ++l) {
    Level L = slab::describe(T[l], S[l], cos, kl, red);
    const at::Tensor* a = gate_or_null(CG[l]);
    const at::Tensor* m = gate_or_null(SG[l]);
    at::Tensor ds = at::empty_like(S[l]);
    at::Tensor dt = teacher_grad ? at::empty_like(T[l]) : at::Tensor();
    at::Tensor da = a ? at::empty_like(*a) : at::empty({0}, S[l].options().dtype(acc));
    at::Tensor dm = m ? at::empty_like(*m) : at::empty({0}, S[l].options().dtype(acc));
    TORCH_CHECK(is_cl(ds) == L.cl, "dcamkd: gradient layout differs from the student's");
    const at::Tensor* gOt = L.cl ? m : a;
    const at::Tensor* gIt = L.cl ? a : m;
    at::Tensor* dgOt = L.cl ? (m ? &dm : nullptr) : (a ? &da : nullptr);
    at::Tensor* dgIt = L.cl ? (a ? &da : nullptr) : (m ? &dm : nullptr);
    DCAMKD_DISPATCH(S[l].scalar_type(), "dcamkd_pyramid_loss_bwd", [&] {
      using A = typename AccT<scalar_t>::type;
      const A* gO = gOt ? gOt->data_ptr<A>() : nullptr;
      const A* gI = gIt ? gIt->data_ptr<A>() : nullptr;
      A* dgO = dgOt ? dgOt->data_ptr<A>() : nullptr;
      A* dgI = dgIt ? dgIt->data_ptr<A>() : nullptr;
      const A* cst = stats[l].data_ptr<A>();
      const A* kst = cst + 3 * L.B * L.RC;
      const A gc = A(gp[2 * l] * L.cos_scale), gk = A(gp[2 * l + 1] * L.kl_scale);
      std::vector<A> gco;
      if (L.cos_global) {
        gco.resize(3 * L.B);
        slab::global_rows<A>(cst, L.B, L.RC, gco.data());
      }
      const at::Tensor& rw = row_weights[l];
      TORCH_CHECK(rw.numel() == 0 || (rw.numel() == L.B * L.RC && L.cr != R_NONE && rw.is_contiguous() &&
                                      rw.scalar_type() == acc),
                  "dcamkd: row_weights[", l, "] must be empty or B*H*W contiguous accumulation-dtype weights");
      const A* cw = rw.numel() ? rw.data_ptr<A>() : nullptr;
      const A* pg = L.cos_global ? gco.data() : nullptr;
      dispatch_red2(L.cr, L.kr, [&](auto cr, auto kr) {
        constexpr int CR = decltype(cr)::value, KR = decltype(kr)::value;
        if (teacher_grad)
          slab_bwd<scalar_t, CR, KR, true>(T[l].data_ptr<scalar_t>(), S[l].data_ptr<scalar_t>(), gO, gI, L.B,
                                           L.NO, L.NI, A(1.0 / tau), A(eps), cst, kst, gc, gk, pg, cw,
                                           ds.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), dgO, dgI);
        else
          slab_bwd<scalar_t, CR, KR, false>(T[l].data_ptr<scalar_t>(), S[l].data_ptr<scalar_t>(), gO, gI, L.B,
                                            L.NO, L.NI, A(1.0 / tau), A(eps), cst, kst, gc, gk, pg, cw,
                                            ds.data_ptr<scalar_t>(), nullptr, dgO, dgI);
      });
    });
    gS.push_back(ds);
    if (teacher_grad) gT.push_back(dt);
    gA.push_back(da);
    gM.push_back(dm);
  }
  return {gS, gT, gA, gM};
}

// Mining weights per level (op dcamkd::mining_weights, spec dcamkd/reference.py mining_weights):
// the channel-CD distance of every location from the saved rows |t_p|, |s'_p|, t_p.s'_p (the same
// expression as reference.cos_distance_from_norms), the threshold over the level's B*H*W
// locations (quantile: the k-th largest, k = floor(N (1 - p) + 1e-9), by a linear-time selection;
// zscore: mean + alpha * unbiased std), then factor where d < threshold, else 1.
std::vector<at::Tensor> mining_weights(at::TensorList stats, c10::IntArrayRef rows, c10::string_view rule,
                                       double factor, const at::Tensor& level, double eps) {
  TORCH_CHECK(stats.size() == rows.size(), "dcamkd: mining_weights got lists of unequal length");
  TORCH_CHECK(rule == "quantile" || rule == "zscore" || rule == "none",
              "dcamkd: mining rule must be none|quantile|zscore, got ", rule);
  const double lv = level.to(at::kDouble).item<double>();  // a CPU scalar: no device sync
  std::vector<at::Tensor> out;
  for (size_t l = 0; l < stats.size(); ++l) {
    const int64_t n = rows[l];
    at::Tensor st = stats[l].contiguous();
    TORCH_CHECK(st.numel() >= 3 * n, "dcamkd: mining_weights: stats[", l, "] holds fewer than 3*rows values");
    at::Tensor w = at::empty({n}, st.options());
    AT_DISPATCH_FLOATING_TYPES(st.scalar_type(), "dcamkd_mining_weights", [&] {
      using A = scalar_t;
      const A* nt = st.data_ptr<A>();
      const A* ns = nt + n;
      const A* ts = nt + 2 * n;
      A* wp = w.data_ptr<A>();
      const A e = A(eps);
      std::vector<A> d(n);
      for (int64_t i = 0; i < n; ++i) {
        const A rt = clamp_min_nan(nt[i], e), rs = clamp_min_nan(ns[i], e);
        const A a = nt[i] / rt, b = ns[i] / rs;
        d[i] = A(0.5) * (a * a + b * b) - ts[i] / (rt * rs);
      }
      A thresh = -std::numeric_limits<A>::infinity();  // rule none: nothing below it
      if (rule == "quantile" && n > 0) {
        const double kd = std::floor(double(n) * (1.0 - lv) + 1e-9);
        const int64_t k = static_cast<int64_t>(std::min(std::max(kd, 0.0), double(n)));
        if (k == 0) {
          thresh = std::numeric_limits<A>::infinity();
        } else {
          std::vector<A> c(d);
          for (auto& x : c) if (x != x) x = std::numeric_limits<A>::infinity();  // NaN sorts first, as torch.sort
          std::nth_element(c.begin(), c.begin() + (k - 1), c.end(), std::greater<A>());
          thresh = c[k - 1];
        }
      } else if (rule == "zscore" && n > 0) {
        double sum = 0;
        for (int64_t i = 0; i < n; ++i) sum += d[i];
        const double mean = sum / double(n);
        double ss = 0;
        for (int64_t i = 0; i < n; ++i) ss += (d[i] - mean) * (d[i] - mean);
        const double sd = n > 1 ? std::sqrt(ss / double(n - 1)) : 0.0;
        thresh = A(mean + lv * sd);
      }
      const A f = A(factor);
      for (int64_t i = 0; i < n; ++i) wp[i] = d[i] < thresh ? f : A(1);
    });
    out.push_back(w);
  }
  return out;
}

TORCH_LIBRARY_IMPL(dcamkd, CPU, m) {
  m.impl("mining_weights", &mining_weights);
  m.impl("pyramid_loss", &pyramid_loss);
  m.impl("pyramid_loss_backward", &pyramid_loss_backward);
}

}  // namespace
}  // namespace dcamkd
