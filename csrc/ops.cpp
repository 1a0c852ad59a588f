// Python bindings of the dcamkd CPU kernels. The op schemas, fake implementations and autograd
// formulas are defined once in Python (dcamkd/ops/*.py, torch.library); these functions are the
// CPU kernels that the registered ops call (dcamkd/ops/_cpu.py).
#include <torch/extension.h>

namespace dcamkd {
std::tuple<at::Tensor, std::vector<at::Tensor>> pyramid_loss_fwd(
    const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, const std::vector<c10::optional<at::Tensor>>&,
    const std::vector<c10::optional<at::Tensor>>&, const std::string&, const std::string&, double,
    const std::string&, double);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
pyramid_loss_bwd(const at::Tensor&, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                 const std::vector<c10::optional<at::Tensor>>&, const std::vector<c10::optional<at::Tensor>>&,
                 const std::vector<at::Tensor>&, const std::string&, const std::string&, double, const std::string&,
                 double, bool);
at::Tensor anomaly_map(const at::Tensor&, const at::Tensor&, double);
std::tuple<at::Tensor, at::Tensor> channel_pool(const at::Tensor&);
at::Tensor channel_pool_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
std::tuple<at::Tensor, at::Tensor> spatial_pool(const at::Tensor&, const c10::optional<at::Tensor>&);
std::tuple<at::Tensor, at::Tensor> spatial_pool_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         const c10::optional<at::Tensor>&, const at::Tensor&);
at::Tensor apply_gates(const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&);
std::tuple<at::Tensor, at::Tensor, at::Tensor> apply_gates_backward(const at::Tensor&, const at::Tensor&,
                                                                    const c10::optional<at::Tensor>&,
                                                                    const c10::optional<at::Tensor>&);
}  // namespace dcamkd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dcamkd fused CPU kernels (pyramid loss, DCAM attention, anomaly map)";
  m.def("pyramid_loss", &dcamkd::pyramid_loss_fwd);
  m.def("pyramid_loss_backward", &dcamkd::pyramid_loss_bwd);
  m.def("anomaly_map", &dcamkd::anomaly_map);
  m.def("channel_pool", &dcamkd::channel_pool);
  m.def("channel_pool_backward", &dcamkd::channel_pool_backward);
  m.def("spatial_pool", &dcamkd::spatial_pool);
  m.def("spatial_pool_backward", &dcamkd::spatial_pool_backward);
  m.def("apply_gates", &dcamkd::apply_gates);
  m.def("apply_gates_backward", &dcamkd::apply_gates_backward);
  m.def("openmp_threads", []() { return at::get_num_threads(); });
}
