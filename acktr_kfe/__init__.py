"""Kronecker-factored natural-gradient preconditioners for PyTorch: K-FAC and EKFAC.

>>> optimizer = acktr_kfe.EKFAC(model, lr=0.01)            # curvature="empirical" by default
>>> loss = criterion(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()

See :class:`KFAC`, :class:`EKFAC`, :class:`Curvature` and :func:`curvature_matrix`. Each layer's curvature is a
block (:class:`CurvatureBlock`: :class:`KFACBlock`, :class:`EKFACBlock`, :class:`EmbeddingDiagonalBlock`);
:class:`KroneckerPreconditioner` schedules and steps them, and :func:`register_preconditioner` /
:func:`preconditioner_class` / :func:`available_preconditioners` name the preconditioners (``"kfac"``, ``"ekfac"``).
:mod:`acktr_kfe.exact` has the exact iEF, EF and SF optimizers for small models, and :func:`approximation_quality`
measures how close any optimizer's update is to the exact natural gradient (Wu et al. 2024).
"""

from . import exact
from .blocks import CurvatureBlock, EKFACBlock, EmbeddingDiagonalBlock, KFACBlock, KroneckerBlock, RefreshResult
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
from .layers import Conv2dAdapter, EmbeddingAdapter, LayerAdapter, LinearAdapter, adapter_for, register_adapter
from .optim import (
    EKFAC,
    KFAC,
    DampingMode,
    DampingScaling,
    KroneckerPreconditioner,
    LossReduction,
    ScaleMode,
    StepNorm,
    TrustRegionMode,
    available_preconditioners,
    curvature_matrix,
    preconditioner_class,
    register_preconditioner,
)
from .quality import ApproximationQuality, approximation_quality, fisher_vector_product, parameter_change
from .trust_region import TrustRegions, kl_clip_scale, predicted_kl

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "KFAC",
    "ApproximationQuality",
    "Conv2dAdapter",
    "Curvature",
    "CurvatureBlock",
    "DampingMode",
    "DampingScaling",
    "EKFACBlock",
    "EmbeddingAdapter",
    "EmbeddingDiagonalBlock",
    "KFACBlock",
    "KroneckerBlock",
    "KroneckerPreconditioner",
    "LayerAdapter",
    "LinearAdapter",
    "LossReduction",
    "Record",
    "RefreshResult",
    "ScaleMode",
    "StatisticsCapture",
    "StepNorm",
    "TrustRegionMode",
    "TrustRegions",
    "adapter_for",
    "approximation_quality",
    "available_preconditioners",
    "bernoulli_fisher_loss",
    "curvature_matrix",
    "exact",
    "fisher_vector_product",
    "gauss_newton_loss",
    "gaussian_fisher_loss",
    "kfe_scale",
    "kl_clip_scale",
    "parameter_change",
    "preconditioner_class",
    "predicted_kl",
    "register_adapter",
    "register_preconditioner",
    "regression_fisher_loss",
    "robust_eigh",
    "softmax_fisher_loss",
]
