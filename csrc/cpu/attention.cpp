// DCAM attention pieces on the CPU: ops dcamkd::channel_pool, dcamkd::spatial_pool,
// dcamkd::apply_gates and their backward ops (schemas, fake implementations and autograd in
// dcamkd/ops/attention.py; spec dcamkd/reference.py channel_pool, spatial_pool, apply_gates).
// Average+max pooling in one read (channel and spatial variants, the spatial one taking the
// channel gate, for cbam) and the gating multiply, with backward. Same (NO, NI) slab view as
// slab.h: NCHW -> (C, HW), channels_last -> (HW, C). A NaN in a pooled row gives a NaN mean and
// max (max_with_nan), as torch.amax does.
// Passes over memory (N elements of x): channel/spatial pooling forward one read; pooling
// backward one read of x and one write of dx: the max's gradient is written assuming a single
// maximum while the ties are counted, and only where a statistic has several maxima (post-ReLU
// zeros) is x read again: the row, in cache, for a reduction along the contiguous axis; the
// 1024-column block of the slab, rewriting only the tied elements, for one along the rows. Gating
// forward one read and one write; gating backward one read of grad and s and one write of ds, the
// gate gradients reduced in the same pass. Every kernel is specialised on which gates are present
// (no multiply by a vector of ones, no accumulation into an unused gate gradient), so the inner
// loops are one stream per tensor and vectorise along the contiguous axis in both layouts; the
// reductions along the rows (NCHW spatial pool, channels_last channel pool) sweep four rows at
// once, so their running rows are loaded and stored once per four rows of x.
#include "common.h"

namespace dcamkd {
namespace {

template <typename T> using Acc = typename AccT<T>::type;

// Calls f(std::integral_constant<bool, HO>, std::integral_constant<bool, HI>) for the gates present.
template <typename F>
void dispatch_gates(bool ho, bool hi, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (ho && hi) return f(T{}, T{});
  if (ho) return f(T{}, N{});
  if (hi) return f(N{}, T{});
  return f(N{}, N{});
}

// Inner-axis block of the outer-axis reductions: the running sums and maxima (2 x 1024 x 4 B)
// stay in L1 while the NO rows stream through.
constexpr int64_t kBlock = 1024;

// Short rows (channels_last channel pool: rows of C elements) without gates: a group of
// kBlock / NI consecutive rows is one contiguous run of the slab, so the forward reduction runs
// one vector loop per group, with a running sum and max per copy of the columns, folded at the
// end, instead of one short loop per row. (Tried for the backward and the gating too: no gain
// measured there, those loops are at their copy bandwidth.)
inline int64_t row_group(int64_t NI) { return NI * 2 <= kBlock ? kBlock / NI : 1; }

// avg/max of v = x * gO[o] * gI[i] (gates where HO / HI) along the inner (OVER_INNER: one
// statistic per outer index) or the outer axis (one per inner index). One read of x.
template <typename scalar_t, bool OVER_INNER, bool HO, bool HI>
void pool_fwd(const scalar_t* X, const Acc<scalar_t>* gO, const Acc<scalar_t>* gI, int64_t B, int64_t NO,
              int64_t NI, Acc<scalar_t>* avg, Acc<scalar_t>* mx) {
  using A = Acc<scalar_t>;
  const A NEG = -std::numeric_limits<A>::infinity();
  if (OVER_INNER) {
    at::parallel_for(0, B * NO, std::max<int64_t>(1, 32768 / std::max<int64_t>(NI, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / NO, o = r % NO;
        const scalar_t* xo = X + r * NI;
        const A g = HO ? gO[b * NO + o] : A(1);
        const A* gi = HI ? gI + b * NI : nullptr;
        A sm = 0, m = NEG;
#pragma omp simd reduction(+ : sm) reduction(max : m)
        for (int64_t i = 0; i < NI; ++i) {
          A v = A(xo[i]);
          if (HO) v *= g;
          if (HI) v *= gi[i];
          sm += v;
          m = v > m ? v : m;
        }
        avg[r] = sm / A(NI);
        mx[r] = max_with_nan(m, sm);
      }
    });
    return;
  }
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> bs(std::min(NI, kBlock)), bm(std::min(NI, kBlock)), gs, gm;
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* x = X + b * NO * NI;
      const A* go = HO ? gO + b * NO : nullptr;
      const A* gib = HI ? gI + b * NI : nullptr;
      for (int64_t i0 = 0; i0 < NI; i0 += kBlock) {
        const int64_t n = std::min(kBlock, NI - i0);
        A* ps = bs.data(); A* pm = bm.data();
        std::fill(ps, ps + n, A(0));
        std::fill(pm, pm + n, NEG);
        const A* gi = HI ? gib + i0 : nullptr;
        const int64_t k = (!HO && !HI) ? row_group(NI) : 1;
        if (k > 1) {  // NI == n: groups of k rows, one loop each
          const int64_t L = k * n;
          gs.assign(L, A(0));
          gm.assign(L, NEG);
          A* qs = gs.data(); A* qm = gm.data();
          for (int64_t o0 = 0; o0 < NO; o0 += k) {
            const int64_t len = std::min(k, NO - o0) * n;
            const scalar_t* xo = x + o0 * NI;
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) {
              const A v = A(xo[j]);
              qs[j] += v;
              qm[j] = v > qm[j] ? v : qm[j];
            }
          }
          for (int64_t q = 0; q < k; ++q)
            for (int64_t i = 0; i < n; ++i) {
              ps[i] += qs[q * n + i];
              pm[i] = qm[q * n + i] > pm[i] ? qm[q * n + i] : pm[i];
            }
        }
        int64_t o = k > 1 ? NO : 0;  // the grouped loop did every row
        for (; o + 4 <= NO; o += 4) {  // four rows per sweep: the running rows loaded once per four
          const scalar_t* x0 = x + o * NI + i0;
          const scalar_t* x1 = x0 + NI; const scalar_t* x2 = x1 + NI; const scalar_t* x3 = x2 + NI;
          const A g0 = HO ? go[o] : A(1), g1 = HO ? go[o + 1] : A(1);
          const A g2 = HO ? go[o + 2] : A(1), g3 = HO ? go[o + 3] : A(1);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            A v0 = A(x0[i]), v1 = A(x1[i]), v2 = A(x2[i]), v3 = A(x3[i]);
            if (HO) { v0 *= g0; v1 *= g1; v2 *= g2; v3 *= g3; }
            if (HI) { const A gii = gi[i]; v0 *= gii; v1 *= gii; v2 *= gii; v3 *= gii; }
            ps[i] += (v0 + v1) + (v2 + v3);
            const A m01 = v0 > v1 ? v0 : v1, m23 = v2 > v3 ? v2 : v3;
            const A m = m01 > m23 ? m01 : m23;
            pm[i] = m > pm[i] ? m : pm[i];
          }
        }
        for (; o < NO; ++o) {
          const scalar_t* xo = x + o * NI + i0;
          const A g = HO ? go[o] : A(1);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            A v = A(xo[i]);
            if (HO) v *= g;
            if (HI) v *= gi[i];
            ps[i] += v;
            pm[i] = v > pm[i] ? v : pm[i];
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          avg[b * NI + i0 + i] = ps[i] / A(NO);
          mx[b * NI + i0 + i] = max_with_nan(pm[i], ps[i]);
        }
      }
    }
  });
}

// Backward of pool_fwd: dv = gavg / n + gmax * [v == max] / count(ties); dx = dv * gO * gI;
// d gO[o] = sum_i dv x gI[i]; d gI[i] = sum_o dv x gO[o]. One read of x and one write of dx: the
// pass assumes one maximum per statistic and counts the ties; a statistic with several maxima
// (post-ReLU zeros) is then corrected, only where v == max. A statistic with no element equal to
// its max (NaN) gets no max gradient, as before.
template <typename scalar_t, bool OVER_INNER, bool HO, bool HI>
void pool_bwd(const Acc<scalar_t>* GA, const Acc<scalar_t>* GM, const scalar_t* X, const Acc<scalar_t>* gO,
              const Acc<scalar_t>* gI, const Acc<scalar_t>* MX, int64_t B, int64_t NO, int64_t NI, scalar_t* DX,
              Acc<scalar_t>* dgO, Acc<scalar_t>* dgI) {
  using A = Acc<scalar_t>;
  const A inv_n = A(1) / A(OVER_INNER ? NI : NO);
  if (OVER_INNER) {
    // rows of x are the statistics' rows; d gI needs a per-batch sum over rows, so split by batch then
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<A> dgi(HI ? NI : 0);
      for (int64_t b = b0; b < b1; ++b) {
        const A* gi = HI ? gI + b * NI : nullptr;
        A* pdgi = dgi.data();
        if (HI) std::fill(pdgi, pdgi + NI, A(0));
        for (int64_t o = 0; o < NO; ++o) {
          const int64_t r = b * NO + o;
          const scalar_t* xo = X + r * NI;
          scalar_t* dxo = DX + r * NI;
          const A g = HO ? gO[r] : A(1);
          const A ca = GA[r] * inv_n, m = MX[r];
          A cm = GM[r];
          A cnt = 0, dgo = 0;
#pragma omp simd reduction(+ : cnt, dgo)
          for (int64_t i = 0; i < NI; ++i) {
            const A xv = A(xo[i]);
            A v = xv, w = A(1);
            if (HO) { v *= g; w = g; }
            if (HI) { v *= gi[i]; w *= gi[i]; }
            const bool hit = v == m;
            const A dv = ca + (hit ? cm : A(0));
            dxo[i] = static_cast<scalar_t>(HO || HI ? dv * w : dv);
            cnt += hit ? A(1) : A(0);
            if (HO) dgo += HI ? dv * xv * gi[i] : dv * xv;
            if (HI) pdgi[i] += HO ? dv * xv * g : dv * xv;
          }
          if (cnt > A(1)) {  // several maxima: redo the row (in cache) with the split gradient
            cm = GM[r] / cnt;
            dgo = 0;
            for (int64_t i = 0; i < NI; ++i) {
              const A xv = A(xo[i]);
              A v = xv, w = A(1);
              if (HO) { v *= g; w = g; }
              if (HI) { v *= gi[i]; w *= gi[i]; }
              const bool hit = v == m;
              const A dv = ca + (hit ? cm : A(0));
              const A dv1 = ca + (hit ? GM[r] : A(0));  // what the first pass added
              if (hit) dxo[i] = static_cast<scalar_t>(HO || HI ? dv * w : dv);
              if (HO) dgo += HI ? dv * xv * gi[i] : dv * xv;
              if (HI) pdgi[i] += HO ? (dv - dv1) * xv * g : (dv - dv1) * xv;
            }
          }
          if (HO) dgO[r] = dgo;
        }
        if (HI) std::memcpy(dgI + b * NI, pdgi, sizeof(A) * NI);
      }
    });
    return;
  }
  // statistics per inner index, reduced over the rows: per batch, block of the inner axis
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    const int64_t nb = std::min(NI, kBlock);
    std::vector<A> ca(nb), cm(nb), mm(nb), cnt(nb);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* x = X + b * NO * NI;
      scalar_t* dx = DX + b * NO * NI;
      const A* go = HO ? gO + b * NO : nullptr;
      if (HO) std::fill(dgO + b * NO, dgO + (b + 1) * NO, A(0));
      for (int64_t i0 = 0; i0 < NI; i0 += kBlock) {
        const int64_t n = std::min(kBlock, NI - i0);
        const int64_t s0 = b * NI + i0;
        const A* gi = HI ? gI + s0 : nullptr;
        A* pca = ca.data(); A* pcm = cm.data(); A* pmm = mm.data(); A* pcnt = cnt.data();
        for (int64_t i = 0; i < n; ++i) {
          pca[i] = GA[s0 + i] * inv_n;
          pcm[i] = GM[s0 + i];
          pmm[i] = MX[s0 + i];
          pcnt[i] = 0;
        }
        A* pdgi = HI ? dgI + s0 : nullptr;
        if (HI) std::fill(pdgi, pdgi + n, A(0));
        int64_t o = 0;
        for (; o + 4 <= NO; o += 4) {  // four rows per sweep, as in pool_fwd
          const scalar_t* x0 = x + o * NI + i0;
          const scalar_t* x1 = x0 + NI; const scalar_t* x2 = x1 + NI; const scalar_t* x3 = x2 + NI;
          scalar_t* d0 = dx + o * NI + i0;
          scalar_t* d1 = d0 + NI; scalar_t* d2 = d1 + NI; scalar_t* d3 = d2 + NI;
          const A g0 = HO ? go[o] : A(1), g1 = HO ? go[o + 1] : A(1);
          const A g2 = HO ? go[o + 2] : A(1), g3 = HO ? go[o + 3] : A(1);
          A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#define DCAMKD_POOL_ROW(K)                                                    \
  {                                                                           \
    const A xv = A(x##K[i]);                                                  \
    A v = xv, w = A(1);                                                       \
    if (HO) { v *= g##K; w = g##K; }                                          \
    if (HI) { v *= gii; w *= gii; }                                           \
    const bool hit = v == m;                                                  \
    const A dv = ca + (hit ? cm : A(0));                                      \
    d##K[i] = static_cast<scalar_t>(HO || HI ? dv * w : dv);                  \
    c += hit ? A(1) : A(0);                                                   \
    if (HO) s##K += HI ? dv * xv * gii : dv * xv;                             \
    if (HI) gsum += HO ? dv * xv * g##K : dv * xv;                            \
  }
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (int64_t i = 0; i < n; ++i) {
            const A m = pmm[i], ca = pca[i], cm = pcm[i];
            const A gii = HI ? gi[i] : A(1);
            A c = 0, gsum = 0;
            DCAMKD_POOL_ROW(0) DCAMKD_POOL_ROW(1) DCAMKD_POOL_ROW(2) DCAMKD_POOL_ROW(3)
            pcnt[i] += c;
            if (HI) pdgi[i] += gsum;
          }
#undef DCAMKD_POOL_ROW
          if (HO) {
            dgO[b * NO + o] += s0; dgO[b * NO + o + 1] += s1;
            dgO[b * NO + o + 2] += s2; dgO[b * NO + o + 3] += s3;
          }
        }
        for (; o < NO; ++o) {
          const scalar_t* xo = x + o * NI + i0;
          scalar_t* dxo = dx + o * NI + i0;
          const A g = HO ? go[o] : A(1);
          A dgo = 0;
#pragma omp simd reduction(+ : dgo)
          for (int64_t i = 0; i < n; ++i) {
            const A xv = A(xo[i]);
            A v = xv, w = A(1);
            if (HO) { v *= g; w = g; }
            if (HI) { v *= gi[i]; w *= gi[i]; }
            const bool hit = v == pmm[i];
            const A dv = pca[i] + (hit ? pcm[i] : A(0));
            dxo[i] = static_cast<scalar_t>(HO || HI ? dv * w : dv);
            pcnt[i] += hit ? A(1) : A(0);
            if (HO) dgo += HI ? dv * xv * gi[i] : dv * xv;
            if (HI) pdgi[i] += HO ? dv * xv * g : dv * xv;
          }
          if (HO) dgO[b * NO + o] += dgo;
        }
        bool fix = false;
        for (int64_t i = 0; i < n; ++i) fix = fix || pcnt[i] > A(1);
        if (!fix) continue;
        // several maxima somewhere in the block: rewrite the tied elements with the split gradient
        for (int64_t o = 0; o < NO; ++o) {
          const scalar_t* xo = x + o * NI + i0;
          scalar_t* dxo = dx + o * NI + i0;
          const A g = HO ? go[o] : A(1);
          A ddgo = 0;
          for (int64_t i = 0; i < n; ++i) {
            if (!(pcnt[i] > A(1))) continue;
            const A xv = A(xo[i]);
            A v = xv, w = A(1);
            if (HO) { v *= g; w = g; }
            if (HI) { v *= gi[i]; w *= gi[i]; }
            if (!(v == pmm[i])) continue;
            const A cmi = pcm[i] / pcnt[i];
            const A dv = pca[i] + cmi, delta = cmi - pcm[i];
            dxo[i] = static_cast<scalar_t>(HO || HI ? dv * w : dv);
            if (HO) ddgo += HI ? delta * xv * gi[i] : delta * xv;
            if (HI) pdgi[i] += HO ? delta * xv * g : delta * xv;
          }
          if (HO) dgO[b * NO + o] += ddgo;
        }
      }
    }
  });
}

// out = s * gO[o] * gI[i]: one read, one write.
template <typename scalar_t, bool HO, bool HI>
void gates_fwd(const scalar_t* S, const Acc<scalar_t>* gO, const Acc<scalar_t>* gI, int64_t B, int64_t NO,
               int64_t NI, scalar_t* OUT) {
  using A = Acc<scalar_t>;
  at::parallel_for(0, B * NO, std::max<int64_t>(1, 32768 / std::max<int64_t>(NI, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* so = S + r * NI;
      scalar_t* out = OUT + r * NI;
      const A g = HO ? gO[r] : A(1);
      const A* gi = HI ? gI + (r / NO) * NI : nullptr;
#pragma omp simd
      for (int64_t i = 0; i < NI; ++i) {
        A v = A(so[i]);
        if (HO) v *= g;
        if (HI) v *= gi[i];
        out[i] = static_cast<scalar_t>(v);
      }
    }
  });
}

// ds = grad * gO * gI; d gO[o] = sum_i grad s gI; d gI[i] = sum_o grad s gO: one read of grad and
// s, one write of ds.
template <typename scalar_t, bool HO, bool HI>
void gates_bwd(const scalar_t* G, const scalar_t* S, const Acc<scalar_t>* gO, const Acc<scalar_t>* gI, int64_t B,
               int64_t NO, int64_t NI, scalar_t* DS, Acc<scalar_t>* dgO, Acc<scalar_t>* dgI) {
  using A = Acc<scalar_t>;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> dgi(HI ? NI : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const A* gi = HI ? gI + b * NI : nullptr;
      A* pdgi = dgi.data();
      if (HI) std::fill(pdgi, pdgi + NI, A(0));
      for (int64_t o = 0; o < NO; ++o) {
        const int64_t off = (b * NO + o) * NI;
        const scalar_t* gr = G + off; const scalar_t* so = S + off;
        scalar_t* dso = DS + off;
        const A g = HO ? gO[b * NO + o] : A(1);
        A dgo = 0;
#pragma omp simd reduction(+ : dgo)
        for (int64_t i = 0; i < NI; ++i) {
          const A gv = A(gr[i]);
          A w = A(1);
          if (HO) w = g;
          if (HI) w = HO ? w * gi[i] : gi[i];
          dso[i] = static_cast<scalar_t>(HO || HI ? gv * w : gv);
          if (HO) { const A sv = A(so[i]); dgo += HI ? gv * sv * gi[i] : gv * sv; }
          if (HI) { const A sv = A(so[i]); pdgi[i] += HO ? gv * sv * g : gv * sv; }
        }
        if (HO) dgO[b * NO + o] = dgo;
      }
      if (HI) std::memcpy(dgI + b * NI, pdgi, sizeof(A) * NI);
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

// Pooling forward over the (NO, NI) view: `over_inner` when the statistics are per outer index;
// gO / gI: the gate along the outer / inner axis (or nullptr).
template <typename scalar_t>
void pool_fwd_any(bool over_inner, const scalar_t* x, const Acc<scalar_t>* gO, const Acc<scalar_t>* gI,
                  const View& v, Acc<scalar_t>* avg, Acc<scalar_t>* mx) {
  dispatch_gates(gO != nullptr, gI != nullptr, [&](auto ho, auto hi) {
    if (over_inner) pool_fwd<scalar_t, true, decltype(ho)::value, decltype(hi)::value>(x, gO, gI, v.B, v.NO, v.NI, avg, mx);
    else pool_fwd<scalar_t, false, decltype(ho)::value, decltype(hi)::value>(x, gO, gI, v.B, v.NO, v.NI, avg, mx);
  });
}

template <typename scalar_t>
void pool_bwd_any(bool over_inner, const Acc<scalar_t>* ga, const Acc<scalar_t>* gm, const scalar_t* x,
                  const Acc<scalar_t>* gO, const Acc<scalar_t>* gI, const Acc<scalar_t>* mx, const View& v,
                  scalar_t* dx, Acc<scalar_t>* dgO, Acc<scalar_t>* dgI) {
  dispatch_gates(gO != nullptr, gI != nullptr, [&](auto ho, auto hi) {
    constexpr bool HO = decltype(ho)::value, HI = decltype(hi)::value;
    if (over_inner) pool_bwd<scalar_t, true, HO, HI>(ga, gm, x, gO, gI, mx, v.B, v.NO, v.NI, dx, dgO, dgI);
    else pool_bwd<scalar_t, false, HO, HI>(ga, gm, x, gO, gI, mx, v.B, v.NO, v.NI, dx, dgO, dgI);
  });
}

std::tuple<at::Tensor, at::Tensor> channel_pool(const at::Tensor& x) {
  View v = view(x);
  auto o = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor avg = at::empty({v.B, v.C}, o), mx = at::empty({v.B, v.C}, o);
  DCAMKD_DISPATCH(x.scalar_type(), "dcamkd_channel_pool", [&] {
    using A = Acc<scalar_t>;
    pool_fwd_any<scalar_t>(!v.cl, x.data_ptr<scalar_t>(), nullptr, nullptr, v, avg.data_ptr<A>(), mx.data_ptr<A>());
  });
  return {avg, mx};
}

at::Tensor channel_pool_backward(const at::Tensor& ga, const at::Tensor& gm, const at::Tensor& x, const at::Tensor& mx) {
  View v = view(x);
  at::Tensor dx = at::empty_like(x);
  DCAMKD_DISPATCH(x.scalar_type(), "dcamkd_channel_pool_bwd", [&] {
    using A = Acc<scalar_t>;
    auto gac = ga.contiguous(), gmc = gm.contiguous(), mxc = mx.contiguous();
    pool_bwd_any<scalar_t>(!v.cl, gac.data_ptr<A>(), gmc.data_ptr<A>(), x.data_ptr<scalar_t>(), nullptr, nullptr,
                           mxc.data_ptr<A>(), v, dx.data_ptr<scalar_t>(), nullptr, nullptr);
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor> spatial_pool(const at::Tensor& x, const std::optional<at::Tensor>& a) {
  View v = view(x);
  auto o = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor avg = at::empty({v.B, x.size(2), x.size(3)}, o), mx = at::empty({v.B, x.size(2), x.size(3)}, o);
  DCAMKD_DISPATCH(x.scalar_type(), "dcamkd_spatial_pool", [&] {
    using A = Acc<scalar_t>;
    const A* pa = ptr<A>(a);
    pool_fwd_any<scalar_t>(v.cl, x.data_ptr<scalar_t>(), v.cl ? nullptr : pa, v.cl ? pa : nullptr, v,
                           avg.data_ptr<A>(), mx.data_ptr<A>());
  });
  return {avg, mx};
}

std::tuple<at::Tensor, at::Tensor> spatial_pool_backward(const at::Tensor& ga, const at::Tensor& gm, const at::Tensor& x,
                                                         const std::optional<at::Tensor>& a, const at::Tensor& mx) {
  View v = view(x);
  at::Tensor dx = at::empty_like(x);
  at::Tensor da = a.has_value() ? at::empty_like(*a) : at::empty({0}, x.options().dtype(acc_type(x.scalar_type())));
  DCAMKD_DISPATCH(x.scalar_type(), "dcamkd_spatial_pool_bwd", [&] {
    using A = Acc<scalar_t>;
    const A* pa = ptr<A>(a);
    A* pda = a.has_value() ? da.data_ptr<A>() : nullptr;
    auto gac = ga.contiguous(), gmc = gm.contiguous(), mxc = mx.contiguous();
    pool_bwd_any<scalar_t>(v.cl, gac.data_ptr<A>(), gmc.data_ptr<A>(), x.data_ptr<scalar_t>(), v.cl ? nullptr : pa,
                           v.cl ? pa : nullptr, mxc.data_ptr<A>(), v, dx.data_ptr<scalar_t>(),
                           v.cl ? nullptr : pda, v.cl ? pda : nullptr);
  });
  return {dx, da};
}

at::Tensor apply_gates(const at::Tensor& s, const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& m) {
  View v = view(s);
  at::Tensor out = at::empty_like(s);
  TORCH_CHECK(is_cl(out) == v.cl, "dcamkd: output layout differs from the input's");
  DCAMKD_DISPATCH(s.scalar_type(), "dcamkd_apply_gates", [&] {
    using A = Acc<scalar_t>;
    const A* pa = ptr<A>(a); const A* pm = ptr<A>(m);
    const A* gO = v.cl ? pm : pa; const A* gI = v.cl ? pa : pm;
    dispatch_gates(gO != nullptr, gI != nullptr, [&](auto ho, auto hi) {
      gates_fwd<scalar_t, decltype(ho)::value, decltype(hi)::value>(s.data_ptr<scalar_t>(), gO, gI, v.B, v.NO, v.NI,
                                                                   out.data_ptr<scalar_t>());
    });
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
    using A = Acc<scalar_t>;
    const A* pa = ptr<A>(a); const A* pm = ptr<A>(m);
    A* pda = a.has_value() ? da.data_ptr<A>() : nullptr;
    A* pdm = m.has_value() ? dm.data_ptr<A>() : nullptr;
    const A* gO = v.cl ? pm : pa; const A* gI = v.cl ? pa : pm;
    dispatch_gates(gO != nullptr, gI != nullptr, [&](auto ho, auto hi) {
      gates_bwd<scalar_t, decltype(ho)::value, decltype(hi)::value>(
          g.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), gO, gI, v.B, v.NO, v.NI, ds.data_ptr<scalar_t>(),
          v.cl ? pdm : pda, v.cl ? pda : pdm);
    });
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
