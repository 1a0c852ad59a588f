"""Fused ops of dcamkd, with backend choice (``auto | reference | cpu | triton | cuda``).

Public API (the signatures of :mod:`dcamkd.reference`, plus ``backend=``):

* :func:`pyramid_terms` - cosine and KL terms of every pyramid level, optional DCAM gates.
* :func:`channel_pool`, :func:`spatial_pool`, :func:`apply_gates` - DCAM attention pieces.
* :func:`anomaly_map_level` - per-level channel cosine distance for inference (forward only).
* :func:`last_backend`, :data:`CALLS` - what actually ran; :func:`register_kernel` - plug-in point.

Backend: ``backend=`` > env ``DCAMKD_BACKEND`` > ``'auto'`` (see :mod:`dcamkd.ops._backend`).
``'reference'`` calls :mod:`dcamkd.reference` directly, without the ops below.

Op contract (for kernel authors)
--------------------------------
Schemas are defined **once, in Python** (``torch.library.define`` in ``pyramid_loss.py``,
``attention.py``, ``anomaly_map.py``), with their fake (meta) implementations and autograd
formulas. C++/CUDA code must not ``TORCH_LIBRARY``-define ``dcamkd`` ops. Every op's last
argument is ``str backend``; the registered CPU and CUDA implementations are trampolines that call
``KERNELS[(op, backend)]`` (:mod:`dcamkd.ops._backend`). A Triton or CUDA kernel plugs in with::

    from dcamkd.ops._backend import register_kernel
    register_kernel("pyramid_loss", "triton", my_fn)   # my_fn(*op args without backend)

in a module ``dcamkd.kernels`` (or ``dcamkd.ops._cuda``), imported lazily at the first call on
a CUDA tensor. ``'auto'`` on CUDA picks ``'cuda'`` then ``'triton'``, else the reference.
Kernels receive tensors prepared by the wrappers: T and S of one dtype (float16, bfloat16,
float32 or float64), each level either both NCHW-contiguous or both channels_last; gates
contiguous in the accumulation dtype ``acc`` (float32; float64 for float64 inputs). Statistics
and outputs are in ``acc``; gradients of T and S in their dtype and layout, of gates in ``acc``.
Modes are strings: ``cos in {channel, spatial, none}``, ``kl in {spatial, channel, none}``,
``kd_reduction in {sum_c, mean_c}``.

``pyramid_loss(Tensor[] teachers, Tensor[] students, Tensor[] channel_gates,
Tensor[] spatial_gates, str cos, str kl, float tau, str kd_reduction, float eps, str backend)
-> (Tensor terms, Tensor[] stats)``
    ``terms``: ``(L, 2)`` [cosine term, KL term] per level (as ``reference.pyramid_terms``).
    Student gated as ``s' = a[b,c] * m[b,h,w] * s``; a level without a gate passes an empty
    ``(0,)`` tensor (meaning 1): gates are ``Tensor[]``, not ``Tensor?[]``, because torch.library
    autograd treats a list holding None as one opaque leaf and would drop the gates' gradients. ``stats[l]``: 1-D, ``acc``,
    ``[cos block | kl block]``. cos block: ``(3, B, R)`` planes ``|t|, |s'|, t.s'`` (plain L2
    norms, no eps) with ``R = H*W`` (channel CD, row = location) or ``C`` (spatial CD, row =
    channel), empty for ``'none'``. kl block: ``(3, B, R)`` planes ``lse_t, lse_s, kl`` with
    ``lse_x = log sum_row exp(x / tau)`` (max-subtracted), ``kl`` the row's KL(P||Q), ``R = C``
    (spatial KD) or ``H*W`` (channel KD), empty for ``'none'``.

``pyramid_loss_backward(Tensor grad_terms, Tensor[] teachers, Tensor[] students,
Tensor[] channel_gates, Tensor[] spatial_gates, Tensor[] stats, str cos, str kl, float tau,
str kd_reduction, float eps, bool teacher_grad, str backend)
-> (Tensor[] grad_students, Tensor[] grad_teachers, Tensor[] grad_channel_gates,
Tensor[] grad_spatial_gates)``
    ``grad_terms`` ``(L, 2)`` contiguous ``acc``. ``grad_teachers`` is ``[]`` unless
    ``teacher_grad``. Gate gradient lists have one entry per level, of the gate's shape (an
    empty ``(0,)`` tensor where that level has no gate). Formulas, with
    ``r_x = max(|x|, eps)``, ``c = t.s'/(r_t r_s)``, ``g'`` = dL/ds':
    cosine ``dd/ds' = alpha s' - t/(r_t r_s)`` with ``alpha = c/r_s^2`` if ``|s'| >= eps``
    else ``1/r_s^2`` (symmetric for t); KL ``dKL/ds'_p = (Q_p - P_p)/tau``, ``dKL/dt_p = P_p/tau * ((t_p - s'_p)/tau - lse_t + lse_s - kl)``;
    ``ds = a m g'``, ``da_c = sum_p m_p s_p g'_p``, ``dm_p = sum_c a_c s_c g'_c``.

``channel_pool(Tensor x, str backend) -> (Tensor avg, Tensor max)``: ``(B, C)`` each, ``acc``.
``channel_pool_backward(Tensor grad_avg, Tensor grad_max, Tensor x, Tensor max, str backend)
-> Tensor``: grad of x (dtype/layout of x); the max gradient is split evenly between ties.
``spatial_pool(Tensor x, Tensor? channel_gate, str backend) -> (Tensor avg, Tensor max)``:
``(B, H, W)`` each, ``acc``, over channels of ``a_c * x``.
``spatial_pool_backward(Tensor grad_avg, Tensor grad_max, Tensor x, Tensor? channel_gate,
Tensor max, str backend) -> (Tensor grad_x, Tensor grad_gate)``: grad_gate ``(B, C)`` or ``(0,)``.
``apply_gates(Tensor s, Tensor? channel_gate, Tensor? spatial_gate, str backend) -> Tensor``.
``apply_gates_backward(Tensor grad, Tensor s, Tensor? channel_gate, Tensor? spatial_gate,
str backend) -> (Tensor grad_s, Tensor grad_channel_gate, Tensor grad_spatial_gate)``: absent
gates give ``(0,)`` tensors; ``grad`` has the layout of ``s``.
``anomaly_map(Tensor t, Tensor s, float eps, str backend) -> Tensor``: ``(B, H, W)`` ``acc``,
forward only.
"""

from __future__ import annotations

from ._backend import CALLS, KERNELS, last_backend, register_kernel, reset_calls
from .anomaly_map import anomaly_map_level
from .attention import apply_gates, channel_pool, spatial_pool
from .pyramid_loss import pyramid_terms

__all__ = [
    "pyramid_terms",
    "channel_pool",
    "spatial_pool",
    "apply_gates",
    "anomaly_map_level",
    "last_backend",
    "register_kernel",
    "reset_calls",
    "CALLS",
    "KERNELS",
]
