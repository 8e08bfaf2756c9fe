"""Layer adapters: how a module's hooked input and output gradient become Kronecker-factor rows.

Convention (docs/DESIGN.md, section 2): a layer with weight ``W`` (out x in) and bias ``b`` is one matrix
``W_hat = [W | b]`` (out x in+1) acting on the homogeneous input ``a_hat = [a; 1]``. Its parameters are ordered
as ``W_hat.flatten()`` (row-major), so the gradient of one example at one location is ``g a_hat^T`` and the
Kronecker approximation of the curvature block is ``kron(G, A)``.

Every adapter returns activations as ``(N, T, in[+1])`` and output gradients as ``(N, T, out)``: ``N`` examples,
``T`` locations per example (1 for a Linear layer on a plain batch, the output positions for a convolution,
the flattened extra dimensions for a Linear layer applied to sequences).

``nn.Embedding`` is the exception: its rows are the token indices ``(N, T)`` (integers) and the output gradients
``(N, T, embedding_dim)``, its matrix view is the weight itself, and its curvature is a diagonal block
(:class:`acktr_kfe.blocks.EmbeddingDiagonalBlock`), not a Kronecker product.

A new module type is supported by subclassing :class:`LayerAdapter` and calling :func:`register_adapter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerAdapter(ABC):
    """Maps one module's tensors to and from the ``[W | b]`` matrix view.

    Args:
        module: the layer whose weight gradient is preconditioned.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.validate(module)

    # --- description -------------------------------------------------------------------------------------
    @staticmethod
    def validate(module: nn.Module) -> None:
        """Raise ``ValueError`` if this module's configuration cannot be preconditioned (default: accept)."""
        del module

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias that is folded into the last column of ``[W | b]``."""
        return getattr(self.module, "bias", None) is not None

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def out_dim(self) -> int:
        """Rows of ``[W | b]``: the size of the G factor."""
        return self.weight.shape[0]

    @property
    def in_dim(self) -> int:
        """Columns of ``[W | b]``: the size of the A factor (the bias column included)."""
        return self.weight[0].numel() + int(self.has_bias)

    def parameters(self) -> list[Tensor]:
        """The parameters this adapter owns, weight first."""
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    # --- tensors -----------------------------------------------------------------------------------------
    @abstractmethod
    def activations(self, layer_input: Tensor) -> Tensor:
        """Homogeneous inputs ``a_hat`` of shape ``(N, T, in[+1])`` from the input the forward hook saw."""

    @abstractmethod
    def output_grads(self, grad_output: Tensor) -> Tensor:
        """Gradients with respect to the layer's output, as ``(N, T, out)``."""

    def _append_ones(self, rows: Tensor) -> Tensor:
        if not self.has_bias:
            return rows
        ones = rows.new_ones((*rows.shape[:-1], 1))
        return torch.cat([rows, ones], dim=-1)

    def join(self, tensors: list[Tensor]) -> Tensor:
        """One tensor per parameter (weight, then bias) as one ``(out, in[+1])`` matrix: inverse of :meth:`split`."""
        matrix = tensors[0].reshape(self.out_dim, -1)
        if self.has_bias:
            matrix = torch.cat([matrix, tensors[1].reshape(-1, 1)], dim=1)
        return matrix

    def grad_matrix(self) -> Tensor | None:
        """The current gradient as ``[dW | db]`` of shape ``(out, in[+1])``; ``None`` if no gradient exists."""
        weight_grad = self.module.weight.grad
        if weight_grad is None:
            return None
        if not self.has_bias:
            return self.join([weight_grad])
        bias_grad = self.module.bias.grad
        return self.join([weight_grad, torch.zeros_like(self.module.bias) if bias_grad is None else bias_grad])

    def param_matrix(self) -> Tensor:
        """The parameters as ``[W | b]`` of shape ``(out, in[+1])``."""
        return self.join([p.detach() for p in self.parameters()])

    def split(self, matrix: Tensor) -> list[Tensor]:
        """Inverse of :meth:`grad_matrix`: one tensor per parameter, shaped like it."""
        weight = self.module.weight
        if not self.has_bias:
            return [matrix.reshape(weight.shape)]
        return [matrix[:, :-1].reshape(weight.shape), matrix[:, -1].reshape(self.module.bias.shape)]


class LinearAdapter(LayerAdapter):
    """``nn.Linear``: inputs ``(N, *, in)``; the extra dimensions ``*`` are locations."""

    def activations(self, layer_input: Tensor) -> Tensor:
        if layer_input.dim() == 1:
            layer_input = layer_input.unsqueeze(0)
        rows = layer_input.reshape(layer_input.shape[0], -1, layer_input.shape[-1])
        return self._append_ones(rows)

    def output_grads(self, grad_output: Tensor) -> Tensor:
        if grad_output.dim() == 1:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])


# Stands for the module's name in an adapter's refusal; the optimizer, which knows the name, puts it in.
EXCLUDE_NAME_PLACEHOLDER = "<its name>"


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` (KFC, Grosse & Martens 2016): im2col patches at each output location.

    Stride, dilation, every padding mode and ``padding="same"`` are supported; the patch of channel-major
    ``(C, kh, kw)`` entries matches ``W.reshape(out, -1)``. Grouped convolutions are refused.
    """

    @staticmethod
    def validate(module: nn.Module) -> None:
        if module.groups != 1:
            raise ValueError(
                f"Conv2d with groups={module.groups} is not supported: K-FAC/EKFAC precondition groups=1 "
                f"convolutions only. Leave this layer out with exclude=[{EXCLUDE_NAME_PLACEHOLDER}] (it then takes an "
                "unpreconditioned step)."
            )

    def activations(self, layer_input: Tensor) -> Tensor:
        module = self.module
        if layer_input.dim() == 3:
            layer_input = layer_input.unsqueeze(0)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        padded = F.pad(layer_input, module._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(padded, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return self._append_ones(patches.transpose(1, 2))

    def output_grads(self, grad_output: Tensor) -> Tensor:
        if grad_output.dim() == 3:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.flatten(2).transpose(1, 2)


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding``: inputs of token indices ``(*)``, outputs ``(*, embedding_dim)``.

    The first input dimension holds the examples and the others are locations: an input ``(N, L)`` is ``N``
    sequences of ``L`` tokens, a 1-D input ``(N,)`` is ``N`` examples of one token each (unlike ``nn.Linear``, whose
    1-D input is one example). The matrix view is the weight ``(num_embeddings, embedding_dim)`` (no bias), so
    ``out_dim`` is the vocabulary and ``in_dim`` the embedding width. A sparse embedding (``sparse=True``) is
    refused: its sparse gradient cannot be preconditioned or stepped by this optimizer.
    """

    @staticmethod
    def validate(module: nn.Module) -> None:
        if module.sparse:
            raise ValueError(
                "nn.Embedding with sparse=True is not supported: its gradient is a sparse tensor, which the "
                "optimizer cannot precondition or step. Build it with sparse=False (the embedding is then "
                "preconditioned with a diagonal Fisher block), or train it with a sparse optimizer "
                "(torch.optim.SparseAdam) and freeze it here (requires_grad=False)."
            )

    @property
    def has_bias(self) -> bool:
        return False

    @property
    def in_dim(self) -> int:
        """Columns of the weight: the embedding width."""
        return self.weight.shape[1]

    def activations(self, layer_input: Tensor) -> Tensor:
        """The token indices as ``(N, T)`` (integers, not homogeneous rows)."""
        if layer_input.dim() == 0:
            return layer_input.reshape(1, 1)
        return layer_input.reshape(layer_input.shape[0], -1)

    def output_grads(self, grad_output: Tensor) -> Tensor:
        if grad_output.dim() == 1:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])


_ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {}


def register_adapter(module_type: type[nn.Module], adapter: type[LayerAdapter]) -> None:
    """Make ``module_type`` (and its subclasses) preconditionable with ``adapter``."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (isinstance(adapter, type) and issubclass(adapter, LayerAdapter)):
        raise TypeError(f"adapter must be a LayerAdapter subclass, got {adapter!r}")
    _ADAPTERS[module_type] = adapter


def adapter_for(module: nn.Module) -> type[LayerAdapter] | None:
    """The adapter class registered for this module's type (most specific first), or ``None``."""
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


register_adapter(nn.Linear, LinearAdapter)
register_adapter(nn.Conv2d, Conv2dAdapter)
register_adapter(nn.Embedding, EmbeddingAdapter)
