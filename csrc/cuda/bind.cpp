// Python bindings of the dcamkd CUDA kernels (a separate extension from the CPU one, loaded by
// dcamkd/kernels/cuda_ext.py). No TORCH_LIBRARY here: the dcamkd ops are defined in Python
// (dcamkd/ops) and these functions are registered as their 'cuda' backend kernels.
#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace dcamkd_cuda {
std::tuple<at::Tensor, at::Tensor> level_forward(const at::Tensor&, const at::Tensor&,
                                                 const c10::optional<at::Tensor>&,
                                                 const c10::optional<at::Tensor>&, int64_t, int64_t, double,
                                                 bool, double);
std::vector<at::Tensor> level_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                       const at::Tensor&, int64_t, int64_t, double, bool, double, bool);
std::tuple<at::Tensor, at::Tensor> channel_pool_fwd(const at::Tensor&);
at::Tensor channel_pool_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
std::tuple<at::Tensor, at::Tensor> spatial_pool_fwd(const at::Tensor&, const c10::optional<at::Tensor>&);
std::tuple<at::Tensor, at::Tensor> spatial_pool_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const c10::optional<at::Tensor>&, const at::Tensor&);
at::Tensor apply_gates_fwd(const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&);
std::tuple<at::Tensor, at::Tensor, at::Tensor> apply_gates_bwd(const at::Tensor&, const at::Tensor&,
                                                               const c10::optional<at::Tensor>&,
                                                               const c10::optional<at::Tensor>&);
at::Tensor anomaly_map_fwd(const at::Tensor&, const at::Tensor&, double);
}  // namespace dcamkd_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dcamkd CUDA kernels (fused pyramid loss, DCAM attention, anomaly map)";
  m.def("level_forward", &dcamkd_cuda::level_forward, "pyramid loss forward of one level");
  m.def("level_backward", &dcamkd_cuda::level_backward, "pyramid loss backward of one level");
  m.def("channel_pool", &dcamkd_cuda::channel_pool_fwd, "channel mean/max pooling");
  m.def("channel_pool_backward", &dcamkd_cuda::channel_pool_bwd, "channel pooling backward");
  m.def("spatial_pool", &dcamkd_cuda::spatial_pool_fwd, "spatial mean/max pooling");
  m.def("spatial_pool_backward", &dcamkd_cuda::spatial_pool_bwd, "spatial pooling backward");
  m.def("apply_gates", &dcamkd_cuda::apply_gates_fwd, "DCAM gating");
  m.def("apply_gates_backward", &dcamkd_cuda::apply_gates_bwd, "DCAM gating backward");
  m.def("anomaly_map", &dcamkd_cuda::anomaly_map_fwd, "per-level anomaly map");
}
