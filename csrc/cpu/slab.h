// The statistics pass shared by the pyramid loss (csrc/cpu/pyramid_loss.cpp) and the anomaly map
// (csrc/cpu/anomaly_map.cpp).
//
// A level of shape (B, C, H, W) is seen, per batch item, as a (NO, NI) slab in memory order:
// NCHW -> (C, HW), channels_last -> (HW, C). A mode reduces either along the inner axis (one row
// per outer index: scalar accumulators, vectorised) or along the outer axis (one row per inner
// index: small per-b buffers of length NI, vectorised over the inner axis). Channel CD in NCHW
// reduces along the outer axis (per-location partial sums in a buffer, no strided gathers);
// spatial KD in NCHW reduces along the inner axis (a row is contiguous). The gated student
// s' = gO[o] * gI[i] * s is formed in registers and never written.
//
// NaN and Inf propagate as in the reference: norms are clamped with clamp_min_nan, the cosine
// distance keeps NaN, and a NaN element makes its row's sums (hence lse and KL) NaN.
#pragma once
#include "common.h"

namespace dcamkd {
namespace slab {

template <typename A>
struct CosCoef {  // d/ds' = as * s' + bb * t ; d/dt = at * t + bb * s'
  A as, at, bb;
};

template <typename A>
DCAMKD_INLINE A cos_value(A tt, A ss, A ts, A eps) {
  A nt = std::sqrt(tt), ns = std::sqrt(ss);
  const A rt = clamp_min_nan(nt, eps), rs = clamp_min_nan(ns, eps);
  const A d = A(0.5) * (tt / (rt * rt) + ss / (rs * rs)) - ts / (rt * rs);
  return d < A(0) ? A(0) : d;  // rounding can give -0.0...; NaN passes
}

template <typename A>
DCAMKD_INLINE CosCoef<A> cos_coef(A nt, A ns, A ts, A eps) {
  const A rt = clamp_min_nan(nt, eps), rs = clamp_min_nan(ns, eps);
  const A c = ts / (rt * rs);
  // clamp_min(eps) passes the norm's gradient where |x| >= eps, as in the reference.
  return {(ns >= eps ? c : A(1)) / (rs * rs), (nt >= eps ? c : A(1)) / (rt * rt), A(-1) / (rt * rs)};
}

// Work split: items (b, k) with k an o-block of the (NO, NI) slab, so that a small batch (batch 1
// at inference) still fills every thread; large batches get one block per item. Levels too small
// to pay for a fork run inline.
inline int64_t n_blocks(int64_t B, int64_t NO, int64_t NI) {
  const int64_t nt = at::get_num_threads();
  if (nt <= 1 || B * NO * NI < (int64_t(1) << 15)) return 1;
  const int64_t want = (4 * nt + B - 1) / B;
  return std::max<int64_t>(1, std::min<int64_t>(want, NO));
}
inline int64_t grain(int64_t B, int64_t NO, int64_t NI, int64_t nblk) {
  return B * NO * NI < (int64_t(1) << 15) ? B * nblk : 1;
}

// Forward of one level. cst / kst: the cos / kl stats blocks, (3, B, R) each. part: per item
// (b, k), NI-long partials of the outer-axis modes: cos [tt | ss | ts], kl [mt | ms | zt | zs | w]
// (zt, zs, w relative to the item's maxima mt, ms), merged per b afterwards (log-sum-exp merge).
template <typename scalar_t, int CR, int KR>
void slab_fwd(const scalar_t* T, const scalar_t* S, const typename AccT<scalar_t>::type* gO,
              const typename AccT<scalar_t>::type* gI, int64_t B, int64_t NO, int64_t NI,
              typename AccT<scalar_t>::type itau, typename AccT<scalar_t>::type eps,
              typename AccT<scalar_t>::type* cst, typename AccT<scalar_t>::type* kst) {
  using A = typename AccT<scalar_t>::type;
  const int64_t RC = CR == R_INNER ? NO : NI, RK = KR == R_INNER ? NO : NI;
  const A NEG = -std::numeric_limits<A>::infinity();
  const int64_t nblk = n_blocks(B, NO, NI), bs = (NO + nblk - 1) / nblk;
  constexpr int64_t PC = CR == R_OUTER ? 3 : 0, PK = KR == R_OUTER ? 5 : 0, NP = PC + PK;
  std::vector<A> part(NP ? size_t(B * nblk * NP * NI) : 0);
  const std::vector<A> ones(std::max(NO, NI), A(1));
  at::parallel_for(0, B * nblk, grain(B, NO, NI, nblk), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / nblk, k = j % nblk;
      const int64_t o0 = k * bs, o1 = std::min(NO, o0 + bs);
      const scalar_t* t = T + b * NO * NI;
      const scalar_t* s = S + b * NO * NI;
      const A* go = gO ? gO + b * NO : ones.data();
      const A* gi = gI ? gI + b * NI : ones.data();
      A* pp = NP ? part.data() + j * NP * NI : nullptr;
      A* ptt = pp; A* pss = pp + NI; A* pts = pp + 2 * NI;
      A* pmt = pp + PC * NI; A* pms = pmt + NI; A* pzt = pms + NI; A* pzs = pzt + NI; A* pw = pzs + NI;
      if (CR == R_OUTER) std::fill(ptt, ptt + 3 * NI, A(0));
      if (KR == R_OUTER) {
        std::fill(pmt, pmt + 2 * NI, NEG);
        std::fill(pzt, pzt + 3 * NI, A(0));
        for (int64_t o = o0; o < o1; ++o) {  // pass A: the item's maxima along the outer axis
          const scalar_t* to = t + o * NI; const scalar_t* so = s + o * NI;
          const A g = go[o];
#pragma omp simd
          for (int64_t i = 0; i < NI; ++i) {
            A tv = A(to[i]) * itau, sv = A(so[i]) * g * gi[i] * itau;
            const A m0 = pmt[i], m1 = pms[i];  // by value: std::max's reference blocks if-conversion
            pmt[i] = tv > m0 ? tv : m0;
            pms[i] = sv > m1 ? sv : m1;
          }
        }
      }
      for (int64_t o = o0; o < o1; ++o) {
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
        const A cmt = mt, cms = ms;
        A tt = 0, ss = 0, ts = 0, zt = 0, zs = 0, w = 0;
#pragma omp simd reduction(+ : tt, ss, ts, zt, zs, w)
        for (int64_t i = 0; i < NI; ++i) {
          A tv = A(to[i]), sv = A(so[i]) * g * gi[i];
          if constexpr (CR == R_INNER) { tt += tv * tv; ss += sv * sv; ts += tv * sv; }
          if constexpr (CR == R_OUTER) { ptt[i] += tv * tv; pss[i] += sv * sv; pts[i] += tv * sv; }
          if constexpr (KR == R_INNER) {
            A et = vexp(tv * itau - cmt);
            zt += et; zs += vexp(sv * itau - cms); w += et * (tv - sv);
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
        }
        if constexpr (KR == R_INNER) {
          A lt = cmt + std::log(zt), ls = cms + std::log(zs);
          kst[b * RK + o] = lt; kst[B * RK + b * RK + o] = ls; kst[2 * B * RK + b * RK + o] = w * itau / zt - lt + ls;
        }
      }
    }
  });
  if constexpr (NP > 0) {  // merge the items of each b into the outer-axis rows' statistics
    at::parallel_for(0, B, grain(B, NO, NI, 1), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const A* p0 = part.data() + b * nblk * NP * NI;
        for (int64_t i = 0; i < NI; ++i) {
          if constexpr (CR == R_OUTER) {
            A tt = 0, ss = 0, ts = 0;
            for (int64_t k = 0; k < nblk; ++k) {
              const A* pp = p0 + k * NP * NI;
              tt += pp[i]; ss += pp[NI + i]; ts += pp[2 * NI + i];
            }
            cst[b * RC + i] = std::sqrt(tt);
            cst[B * RC + b * RC + i] = std::sqrt(ss);
            cst[2 * B * RC + b * RC + i] = ts;
          }
          if constexpr (KR == R_OUTER) {
            A mt = NEG, ms = NEG;
            for (int64_t k = 0; k < nblk; ++k) {
              const A* pp = p0 + k * NP * NI + PC * NI;
              mt = std::max(mt, pp[i]); ms = std::max(ms, pp[NI + i]);
            }
            A zt = 0, zs = 0, w = 0;
            for (int64_t k = 0; k < nblk; ++k) {
              const A* pp = p0 + k * NP * NI + PC * NI;
              if (pp[i] == NEG) continue;  // an empty block (NO not a multiple of the block size)
              const A ft = std::exp(pp[i] - mt), fs = std::exp(pp[NI + i] - ms);
              zt += ft * pp[2 * NI + i]; zs += fs * pp[3 * NI + i]; w += ft * pp[4 * NI + i];
            }
            A lt = mt + std::log(zt), ls = ms + std::log(zs);
            kst[b * RK + i] = lt; kst[B * RK + b * RK + i] = ls; kst[2 * B * RK + b * RK + i] = w * itau / zt - lt + ls;
          }
        }
      }
    });
  }
}

// Sums of the per-row terms from the statistics: (sum_rows cos distance, sum_rows KL).
template <typename A>
std::pair<double, double> stat_sums(const A* cst, const A* kst, int64_t nc, int64_t nk, A eps) {
  double cs = 0, ks = 0;
  for (int64_t r = 0; r < nc; ++r) {
    const A nt = cst[r], ns = cst[nc + r];
    cs += cos_value(nt * nt, ns * ns, cst[2 * nc + r], eps);
  }
  for (int64_t r = 0; r < nk; ++r) ks += kst[2 * nk + r];
  return {cs, ks};
}

// Per image b of a level in global mode (rows = locations): the plain norms and dot product of
// the whole flattened maps, out[3b..3b+2] = |t_b|, |s'_b|, t_b.s'_b, from the location rows.
template <typename A>
void global_rows(const A* cst, int64_t B, int64_t R, A* out) {
  for (int64_t b = 0; b < B; ++b) {
    A tt = 0, ss = 0, ts = 0;
    for (int64_t r = 0; r < R; ++r) {
      const A nt = cst[b * R + r], ns = cst[B * R + b * R + r];
      tt += nt * nt; ss += ns * ns; ts += cst[2 * B * R + b * R + r];
    }
    out[3 * b] = std::sqrt(tt); out[3 * b + 1] = std::sqrt(ss); out[3 * b + 2] = ts;
  }
}

inline int cos_code(c10::string_view m, bool cl) {
  if (m == "none") return R_NONE;
  if (m == "channel" || m == "global") return cl ? R_INNER : R_OUTER;  // global: location rows
  TORCH_CHECK(m == "spatial", "dcamkd: cos must be channel|spatial|global|none, got ", m);
  return cl ? R_OUTER : R_INNER;
}

inline int kl_code(c10::string_view m, bool cl) {
  if (m == "none") return R_NONE;
  if (m == "channel") return cl ? R_INNER : R_OUTER;
  TORCH_CHECK(m == "spatial", "dcamkd: kl must be spatial|channel|none, got ", m);
  return cl ? R_OUTER : R_INNER;
}

struct Level {
  int64_t B, C, HW, NO, NI, RC, RK;
  bool cl, cos_global;
  int cr, kr;
  double cos_scale, kl_scale;
};

inline Level describe(const at::Tensor& t, const at::Tensor& s, c10::string_view cos, c10::string_view kl,
                      c10::string_view red) {
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
  L.cos_global = cos == "global";
  L.RC = (cos == "channel" || L.cos_global) ? L.HW : (cos == "spatial" ? L.C : 0);
  L.RK = kl == "channel" ? L.HW : (kl == "spatial" ? L.C : 0);
  L.cos_scale = L.RC ? 1.0 / double(L.cos_global ? L.B : L.B * L.RC) : 0.0;
  L.kl_scale = L.RK ? ((kl == "spatial" && red == "sum_c") ? 1.0 / double(L.B) : 1.0 / double(L.B * L.RK)) : 0.0;
  return L;
}

}  // namespace slab
}  // namespace dcamkd
