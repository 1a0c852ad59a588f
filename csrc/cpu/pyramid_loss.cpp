// Fused pyramid distillation loss (cosine term + KL term per level, DCAM gates inside), CPU.
//
// A level of shape (B, C, H, W) is seen, per batch item, as a (NO, NI) slab in memory order:
// NCHW -> (C, HW), channels_last -> (HW, C). A mode reduces either along the inner axis (one row
// per outer index: scalar accumulators, vectorised) or along the outer axis (one row per inner
// index: small per-b buffers of length NI, vectorised over the inner axis). Channel CD in NCHW
// reduces along the outer axis (per-location partial sums in a buffer, no strided gathers);
// spatial KD in NCHW reduces along the inner axis (a row is contiguous). The gated student
// s' = gO[o] * gI[i] * s is formed in registers and never written.
#include "common.h"

namespace dcamkd {
namespace {

template <typename A>
struct CosCoef {  // d/ds' = as * s' + bb * t ; d/dt = at * t + bb * s'
  A as, at, bb;
};

template <typename A>
DCAMKD_INLINE A cos_value(A tt, A ss, A ts, A eps) {
  A nt = std::sqrt(tt), ns = std::sqrt(ss);
  A rt = nt > eps ? nt : eps, rs = ns > eps ? ns : eps;
  A d = A(0.5) * (tt / (rt * rt) + ss / (rs * rs)) - ts / (rt * rs);
  return d > A(0) ? d : A(0);
}

template <typename A>
DCAMKD_INLINE CosCoef<A> cos_coef(A nt, A ns, A ts, A eps) {
  A rt = nt > eps ? nt : eps, rs = ns > eps ? ns : eps;
  A c = ts / (rt * rs);
  // clamp_min(eps) passes the norm's gradient where |x| >= eps, as in the reference.
  return {(ns >= eps ? c : A(1)) / (rs * rs), (nt >= eps ? c : A(1)) / (rt * rt), A(-1) / (rt * rs)};
}

// Forward of one level. cst / kst: the cos / kl stats blocks, (3, B, R) each.
template <typename scalar_t, int CR, int KR>
void slab_fwd(const scalar_t* T, const scalar_t* S, const typename AccT<scalar_t>::type* gO,
              const typename AccT<scalar_t>::type* gI, int64_t B, int64_t NO, int64_t NI,
              typename AccT<scalar_t>::type itau, typename AccT<scalar_t>::type eps,
              typename AccT<scalar_t>::type* cst, typename AccT<scalar_t>::type* kst,
              std::vector<double>& csum, std::vector<double>& ksum) {
  using A = typename AccT<scalar_t>::type;
  const int64_t RC = CR == R_INNER ? NO : NI, RK = KR == R_INNER ? NO : NI;
  const A NEG = -std::numeric_limits<A>::infinity();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> ones;
    std::vector<A> btt, bss, bts, bmt, bms, bzt, bzs, bw;
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* t = T + b * NO * NI;
      const scalar_t* s = S + b * NO * NI;
      if ((!gO || !gI) && ones.empty()) ones.assign(std::max(NO, NI), A(1));
      const A* go = gO ? gO + b * NO : ones.data();
      const A* gi = gI ? gI + b * NI : ones.data();
      double cs = 0, ks = 0;
      if (CR == R_OUTER) { btt.assign(NI, A(0)); bss.assign(NI, A(0)); bts.assign(NI, A(0)); }
      if (KR == R_OUTER) {
        bmt.assign(NI, NEG); bms.assign(NI, NEG);
        bzt.assign(NI, A(0)); bzs.assign(NI, A(0)); bw.assign(NI, A(0));
        A* mt = bmt.data(); A* ms = bms.data();
        for (int64_t o = 0; o < NO; ++o) {  // pass A: per-row maxima along the outer axis
          const scalar_t* to = t + o * NI; const scalar_t* so = s + o * NI;
          const A g = go[o];
#pragma omp simd
          for (int64_t i = 0; i < NI; ++i) {
            A tv = A(to[i]) * itau, sv = A(so[i]) * g * gi[i] * itau;
            mt[i] = tv > mt[i] ? tv : mt[i];
            ms[i] = sv > ms[i] ? sv : ms[i];
          }
        }
      }
      A* ptt = btt.data(); A* pss = bss.data(); A* pts = bts.data();
      A* pmt = bmt.data(); A* pms = bms.data(); A* pzt = bzt.data(); A* pzs = bzs.data(); A* pw = bw.data();
      for (int64_t o = 0; o < NO; ++o) {
        const scalar_t* to = t + o * NI; const scalar_t* so = s + o * NI;
        const A g = go[o];
        A mt = NEG, ms = NEG;
        if (KR == R_INNER) {  // row pass 1 (the row then sits in L1 for pass 2)
#pragma omp simd reduction(max : mt, ms)
          for (int64_t i = 0; i < NI; ++i) {
            A tv = A(to[i]) * itau, sv = A(so[i]) * g * gi[i] * itau;
            mt = tv > mt ? tv : mt;
            ms = sv > ms ? sv : ms;
          }
        }
        A tt = 0, ss = 0, ts = 0, zt = 0, zs = 0, w = 0;
#pragma omp simd reduction(+ : tt, ss, ts, zt, zs, w)
        for (int64_t i = 0; i < NI; ++i) {
          A tv = A(to[i]), sv = A(so[i]) * g * gi[i];
          if constexpr (CR == R_INNER) { tt += tv * tv; ss += sv * sv; ts += tv * sv; }
          if constexpr (CR == R_OUTER) { ptt[i] += tv * tv; pss[i] += sv * sv; pts[i] += tv * sv; }
          if constexpr (KR == R_INNER) {
            A et = vexp(tv * itau - mt);
            zt += et; zs += vexp(sv * itau - ms); w += et * (tv - sv);
          }
          if constexpr (KR == R_OUTER) {
            A et = vexp(tv * itau - pmt[i]);
            pzt[i] += et; pzs[i] += vexp(sv * itau - pms[i]); pw[i] += et * (tv - sv);
          }
        }
        if constexpr (CR == R_INNER) {
          cst[b * RC + o] = std::sqrt(tt);
          cst[B * RC + b * RC + o] = std::sqrt(ss);
          cst[2 * B * RC + b * RC + o] = ts;
          cs += cos_value(tt, ss, ts, eps);
        }
        if constexpr (KR == R_INNER) {
          A lt = mt + std::log(zt), ls = ms + std::log(zs);
          A kl = w * itau / zt - lt + ls;
          kst[b * RK + o] = lt; kst[B * RK + b * RK + o] = ls; kst[2 * B * RK + b * RK + o] = kl;
          ks += kl;
        }
      }
      if constexpr (CR == R_OUTER) {
        for (int64_t i = 0; i < NI; ++i) {
          cst[b * RC + i] = std::sqrt(ptt[i]);
          cst[B * RC + b * RC + i] = std::sqrt(pss[i]);
          cst[2 * B * RC + b * RC + i] = pts[i];
          cs += cos_value(ptt[i], pss[i], pts[i], eps);
        }
      }
      if constexpr (KR == R_OUTER) {
        for (int64_t i = 0; i < NI; ++i) {
          A lt = pmt[i] + std::log(pzt[i]), ls = pms[i] + std::log(pzs[i]);
          A kl = pw[i] * itau / pzt[i] - lt + ls;
          kst[b * RK + i] = lt; kst[B * RK + b * RK + i] = ls; kst[2 * B * RK + b * RK + i] = kl;
          ks += kl;
        }
      }
      csum[b] = cs;
      ksum[b] = ks;
    }
  });
}

// Backward of one level: one read of T and S, one write of dS (and dT), gate grads formed in the
// same pass. gc / gk: grad_output of the cos / kl term times its mean factor.
template <typename scalar_t, int CR, int KR, bool TG>
void slab_bwd(const scalar_t* T, const scalar_t* S, const typename AccT<scalar_t>::type* gO,
              const typename AccT<scalar_t>::type* gI, int64_t B, int64_t NO, int64_t NI,
              typename AccT<scalar_t>::type itau, typename AccT<scalar_t>::type eps,
              const typename AccT<scalar_t>::type* cst, const typename AccT<scalar_t>::type* kst,
              typename AccT<scalar_t>::type gc, typename AccT<scalar_t>::type gk, scalar_t* dS,
              scalar_t* dT, typename AccT<scalar_t>::type* dgO, typename AccT<scalar_t>::type* dgI) {
  using A = typename AccT<scalar_t>::type;
  const int64_t RC = CR == R_INNER ? NO : NI, RK = KR == R_INNER ? NO : NI;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> ones, cas, cat, cbb, klt, kls, kkv, dgi;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * NO * NI;
      const scalar_t* t = T + off; const scalar_t* s = S + off;
      scalar_t* ds = dS + off;
      scalar_t* dt = TG ? dT + off : nullptr;
      if ((!gO || !gI) && ones.empty()) ones.assign(std::max(NO, NI), A(1));
      const A* go = gO ? gO + b * NO : ones.data();
      const A* gi = gI ? gI + b * NI : ones.data();
      if (CR == R_OUTER) {
        cas.resize(NI); cat.resize(NI); cbb.resize(NI);
        for (int64_t i = 0; i < NI; ++i) {
          auto k = cos_coef<A>(cst[b * RC + i], cst[B * RC + b * RC + i], cst[2 * B * RC + b * RC + i], eps);
          cas[i] = gc * k.as; cat[i] = gc * k.at; cbb[i] = gc * k.bb;
        }
      }
      if (KR == R_OUTER) {
        klt.resize(NI); kls.resize(NI); kkv.resize(NI);
        for (int64_t i = 0; i < NI; ++i) {
          klt[i] = kst[b * RK + i]; kls[i] = kst[B * RK + b * RK + i]; kkv[i] = kst[2 * B * RK + b * RK + i];
        }
      }
      dgi.assign(NI, A(0));
      const A* pas = cas.data(); const A* pat = cat.data(); const A* pbb = cbb.data();
      const A* plt = klt.data(); const A* pls = kls.data(); const A* pkv = kkv.data();
      A* pdgi = dgi.data();
      for (int64_t o = 0; o < NO; ++o) {
        const scalar_t* to = t + o * NI; const scalar_t* so = s + o * NI;
        scalar_t* dso = ds + o * NI;
        scalar_t* dto = TG ? dt + o * NI : nullptr;
        const A g = go[o];
        A ras = 0, rat = 0, rbb = 0, rlt = 0, rls = 0, rkv = 0;
        if constexpr (CR == R_INNER) {
          auto k = cos_coef<A>(cst[b * RC + o], cst[B * RC + b * RC + o], cst[2 * B * RC + b * RC + o], eps);
          ras = gc * k.as; rat = gc * k.at; rbb = gc * k.bb;
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
          if constexpr (CR == R_INNER) { gs += ras * sv + rbb * tv; gt += rat * tv + rbb * sv; }
          if constexpr (CR == R_OUTER) { gs += pas[i] * sv + pbb[i] * tv; gt += pat[i] * tv + pbb[i] * sv; }
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
      if (dgI) std::memcpy(dgI + b * NI, pdgi, sizeof(A) * NI);
    }
  });
}

int cos_code(const std::string& m, bool cl) {
  if (m == "none") return R_NONE;
  if (m == "channel") return cl ? R_INNER : R_OUTER;
  TORCH_CHECK(m == "spatial", "dcamkd: cos must be channel|spatial|none, got ", m);
  return cl ? R_OUTER : R_INNER;
}

int kl_code(const std::string& m, bool cl) {
  if (m == "none") return R_NONE;
  if (m == "channel") return cl ? R_INNER : R_OUTER;
  TORCH_CHECK(m == "spatial", "dcamkd: kl must be spatial|channel|none, got ", m);
  return cl ? R_OUTER : R_INNER;
}

struct Level {
  int64_t B, C, HW, NO, NI, RC, RK;
  bool cl;
  int cr, kr;
  double cos_scale, kl_scale;
};

Level describe(const at::Tensor& t, const at::Tensor& s, const std::string& cos, const std::string& kl,
               const std::string& red) {
  TORCH_CHECK(t.dim() == 4 && t.sizes() == s.sizes(), "dcamkd: teacher/student must be equal 4-D shapes");
  TORCH_CHECK(t.scalar_type() == s.scalar_type(), "dcamkd: teacher/student dtypes differ");
  Level L;
  L.B = s.size(0); L.C = s.size(1); L.HW = s.size(2) * s.size(3);
  L.cl = is_cl(s);
  TORCH_CHECK(is_cl(t) == L.cl || t.is_contiguous() == s.is_contiguous(), "dcamkd: layouts differ");
  L.NO = L.cl ? L.HW : L.C;
  L.NI = L.cl ? L.C : L.HW;
  L.cr = cos_code(cos, L.cl);
  L.kr = kl_code(kl, L.cl);
  L.RC = cos == "channel" ? L.HW : (cos == "spatial" ? L.C : 0);
  L.RK = kl == "channel" ? L.HW : (kl == "spatial" ? L.C : 0);
  L.cos_scale = L.RC ? 1.0 / double(L.B * L.RC) : 0.0;
  L.kl_scale = L.RK ? ((kl == "spatial" && red == "sum_c") ? 1.0 / double(L.B) : 1.0 / double(L.B * L.RK)) : 0.0;
  return L;
}

const at::Tensor* opt(const c10::optional<at::Tensor>& x) { return x.has_value() ? &*x : nullptr; }

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> pyramid_loss_fwd(
    const std::vector<at::Tensor>& T, const std::vector<at::Tensor>& S,
    const std::vector<c10::optional<at::Tensor>>& CG, const std::vector<c10::optional<at::Tensor>>& SG,
    const std::string& cos, const std::string& kl, double tau, const std::string& red, double eps) {
  const int64_t n = static_cast<int64_t>(S.size());
  TORCH_CHECK(n > 0 && T.size() == S.size() && CG.size() == S.size() && SG.size() == S.size(),
              "dcamkd: pyramid lists must be non-empty and of equal length");
  auto acc = acc_type(S[0].scalar_type());
  at::Tensor terms = at::zeros({n, 2}, S[0].options().dtype(acc));
  std::vector<at::Tensor> stats;
  for (int64_t l = 0; l < n; ++l) {
    Level L = describe(T[l], S[l], cos, kl, red);
    at::Tensor st = at::empty({3 * L.B * L.RC + 3 * L.B * L.RK}, S[l].options().dtype(acc));
    const at::Tensor* a = opt(CG[l]);
    const at::Tensor* m = opt(SG[l]);
    const at::Tensor* gOt = L.cl ? m : a;
    const at::Tensor* gIt = L.cl ? a : m;
    std::vector<double> csum(L.B, 0.0), ksum(L.B, 0.0);
    DCAMKD_DISPATCH(S[l].scalar_type(), "dcamkd_pyramid_loss_fwd", [&] {
      using A = typename AccT<scalar_t>::type;
      const A* gO = gOt ? gOt->data_ptr<A>() : nullptr;
      const A* gI = gIt ? gIt->data_ptr<A>() : nullptr;
      A* cst = st.data_ptr<A>();
      A* kst = cst + 3 * L.B * L.RC;
      dispatch_red2(L.cr, L.kr, [&](auto cr, auto kr) {
        slab_fwd<scalar_t, decltype(cr)::value, decltype(kr)::value>(
            T[l].data_ptr<scalar_t>(), S[l].data_ptr<scalar_t>(), gO, gI, L.B, L.NO, L.NI,
            A(1.0 / tau), A(eps), cst, kst, csum, ksum);
      });
    });
    double cs = 0, ks = 0;
    for (int64_t b = 0; b < L.B; ++b) { cs += csum[b]; ks += ksum[b]; }
    terms[l][0].fill_(cs * L.cos_scale);
    terms[l][1].fill_(ks * L.kl_scale);
    stats.push_back(st);
  }
  return {terms, stats};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
pyramid_loss_bwd(const at::Tensor& grad_terms, const std::vector<at::Tensor>& T, const std::vector<at::Tensor>& S,
                 const std::vector<c10::optional<at::Tensor>>& CG, const std::vector<c10::optional<at::Tensor>>& SG,
                 const std::vector<at::Tensor>& stats, const std::string& cos, const std::string& kl, double tau,
                 const std::string& red, double eps, bool teacher_grad) {
  const int64_t n = static_cast<int64_t>(S.size());
  auto acc = acc_type(S[0].scalar_type());
  at::Tensor gterm = grad_terms.to(at::kDouble).contiguous();
  const double* gp = gterm.data_ptr<double>();
  std::vector<at::Tensor> gS, gT, gA, gM;
  for (int64_t l = 0; l < n; ++l) {
    Level L = describe(T[l], S[l], cos, kl, red);
    const at::Tensor* a = opt(CG[l]);
    const at::Tensor* m = opt(SG[l]);
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
      dispatch_red2(L.cr, L.kr, [&](auto cr, auto kr) {
        constexpr int CR = decltype(cr)::value, KR = decltype(kr)::value;
        if (teacher_grad)
          slab_bwd<scalar_t, CR, KR, true>(T[l].data_ptr<scalar_t>(), S[l].data_ptr<scalar_t>(), gO, gI, L.B,
                                           L.NO, L.NI, A(1.0 / tau), A(eps), cst, kst, gc, gk,
                                           ds.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), dgO, dgI);
        else
          slab_bwd<scalar_t, CR, KR, false>(T[l].data_ptr<scalar_t>(), S[l].data_ptr<scalar_t>(), gO, gI, L.B,
                                            L.NO, L.NI, A(1.0 / tau), A(eps), cst, kst, gc, gk,
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

// Anomaly map: the channel-CD statistics of slab_fwd, then d per location.
at::Tensor anomaly_map(const at::Tensor& t, const at::Tensor& s, double eps) {
  Level L = describe(t, s, "channel", "none", "sum_c");
  auto acc = acc_type(s.scalar_type());
  at::Tensor st = at::empty({3 * L.B * L.HW}, s.options().dtype(acc));
  at::Tensor out = at::empty({L.B, s.size(2), s.size(3)}, s.options().dtype(acc));
  std::vector<double> csum(L.B), ksum(L.B);
  DCAMKD_DISPATCH(s.scalar_type(), "dcamkd_anomaly_map", [&] {
    using A = typename AccT<scalar_t>::type;
    A* cst = st.data_ptr<A>();
    if (L.cl)
      slab_fwd<scalar_t, R_INNER, R_NONE>(t.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), nullptr, nullptr, L.B,
                                          L.NO, L.NI, A(1), A(eps), cst, nullptr, csum, ksum);
    else
      slab_fwd<scalar_t, R_OUTER, R_NONE>(t.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), nullptr, nullptr, L.B,
                                          L.NO, L.NI, A(1), A(eps), cst, nullptr, csum, ksum);
    A* o = out.data_ptr<A>();
    const int64_t N = L.B * L.HW;
    const A e = A(eps);
    for (int64_t k = 0; k < N; ++k) {
      A nt = cst[k], ns = cst[N + k];
      o[k] = cos_value(nt * nt, ns * ns, cst[2 * N + k], e);
    }
  });
  return out;
}

}  // namespace dcamkd
