// Anomaly map of one pyramid level on the CPU: op dcamkd::anomaly_map (forward only; schema and
// fake implementation in dcamkd/ops/anomaly_map.py; spec dcamkd/reference.py anomaly_map_level).
// The channel-CD statistics of slab::slab_fwd (|t|, |s|, t.s per location, one read of T and S),
// then d(t_p, s_p) per location. NaN and Inf give NaN, as in the reference.
#include "slab.h"

namespace dcamkd {
namespace {

at::Tensor anomaly_map(const at::Tensor& t, const at::Tensor& s, double eps) {
  slab::Level L = slab::describe(t, s, "channel", "none", "sum_c");
  auto acc = acc_type(s.scalar_type());
  at::Tensor st = at::empty({3 * L.B * L.HW}, s.options().dtype(acc));
  at::Tensor out = at::empty({L.B, s.size(2), s.size(3)}, s.options().dtype(acc));
  DCAMKD_DISPATCH(s.scalar_type(), "dcamkd_anomaly_map", [&] {
    using A = typename AccT<scalar_t>::type;
    A* cst = st.data_ptr<A>();
    if (L.cl)
      slab::slab_fwd<scalar_t, R_INNER, R_NONE>(t.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), nullptr, nullptr,
                                                L.B, L.NO, L.NI, A(1), A(eps), cst, nullptr);
    else
      slab::slab_fwd<scalar_t, R_OUTER, R_NONE>(t.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), nullptr, nullptr,
                                                L.B, L.NO, L.NI, A(1), A(eps), cst, nullptr);
    A* o = out.data_ptr<A>();
    const int64_t N = L.B * L.HW;
    const A e = A(eps);
    for (int64_t k = 0; k < N; ++k) {
      const A nt = cst[k], ns = cst[N + k];
      o[k] = slab::cos_value(nt * nt, ns * ns, cst[2 * N + k], e);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(dcamkd, CPU, m) {
  m.impl("anomaly_map", &anomaly_map);
}

}  // namespace
}  // namespace dcamkd
