"""Kronecker-factored natural-gradient preconditioners for PyTorch: K-FAC and EKFAC.

>>> optimizer = acktr_kfe.EKFAC(model, lr=0.01)            # curvature="empirical" by default
>>> loss = criterion(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()

See :class:`KFAC`, :class:`EKFAC`, :class:`Curvature` and :func:`curvature_matrix`.
"""

from . import exact
from .capture import Record, StatisticsCapture
from .curvature import (
    Curvature,
    bernoulli_fisher_loss,
    gauss_newton_loss,
    gaussian_fisher_loss,
    regression_fisher_loss,
    softmax_fisher_loss,
)
from .eigen import kfe_scale, robust_eigh
from .layers import Conv2dAdapter, LayerAdapter, LinearAdapter, adapter_for, register_adapter
from .optim import (
    EKFAC,
    KFAC,
    DampingMode,
    DampingScaling,
    LossReduction,
    ScaleMode,
    StepNorm,
    TrustRegionMode,
    curvature_matrix,
)
from .trust_region import kl_clip_scale, predicted_kl

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "KFAC",
    "Conv2dAdapter",
    "Curvature",
    "DampingMode",
    "DampingScaling",
    "LayerAdapter",
    "LinearAdapter",
    "LossReduction",
    "Record",
    "ScaleMode",
    "StatisticsCapture",
    "StepNorm",
    "TrustRegionMode",
    "adapter_for",
    "bernoulli_fisher_loss",
    "curvature_matrix",
    "exact",
    "gauss_newton_loss",
    "gaussian_fisher_loss",
    "kfe_scale",
    "kl_clip_scale",
    "predicted_kl",
    "register_adapter",
    "regression_fisher_loss",
    "robust_eigh",
    "softmax_fisher_loss",
]
