"""Dense float64 references for the preconditioner tests, built without the library's own code paths.

Per-example gradients come from ``torch.func`` (vmap over grad); convolution patches from explicit loops over
output positions; output gradients from autograd on the sum of per-example losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def per_example_grads(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor
) -> dict[str, Tensor]:
    """``{parameter name: (N, *shape)}``: the gradient of each example's own loss."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def single_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, params, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(single_loss), in_dims=(None, 0, 0))(params, inputs, targets)


def layer_grad_rows(grads: dict[str, Tensor], prefix: str, has_bias: bool) -> Tensor:
    """Per-example ``vec([dW | db])`` (row-major) of one layer, shape ``(N, out * (in + 1))``."""
    weight = grads[f"{prefix}.weight"]
    matrix = weight.reshape(weight.shape[0], weight.shape[1], -1)
    if has_bias:
        matrix = torch.cat([matrix, grads[f"{prefix}.bias"].unsqueeze(-1)], dim=-1)
    return matrix.reshape(matrix.shape[0], -1)


def second_moment(rows: Tensor) -> Tensor:
    """``E_n[r_n r_n^T]`` for rows ``(N, P)``."""
    return rows.T @ rows / rows.shape[0]


def conv_patches_loop(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """im2col by explicit loops: ``(N, T, C * kh * kw)`` patches, channel-major, zero padding."""
    ph, pw = conv.padding
    sh, sw = conv.stride
    dh, dw = conv.dilation
    kh, kw = conv.kernel_size
    padded = F.pad(x, (pw, pw, ph, ph))
    n, _c, h, w = padded.shape
    out_h = (h - dh * (kh - 1) - 1) // sh + 1
    out_w = (w - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(out_h):
        for j in range(out_w):
            patch = padded[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            rows.append(patch.reshape(n, -1))
    return torch.stack(rows, dim=1)


def layer_io(
    model: nn.Module, layer: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    """The layer's input, and ``d l_n / d output_n`` of each example's own loss (not divided by N)."""
    seen: dict[str, Tensor] = {}

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        seen["input"] = inputs[0].detach()
        output.retain_grad()
        seen["output"] = output

    handle = layer.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        handle.remove()
    per_example_sum = sum(loss_fn(out[i : i + 1], y[i : i + 1]) for i in range(x.shape[0]))
    per_example_sum.backward()
    model.zero_grad()
    return seen["input"], seen["output"].grad.detach()


def homogeneous(rows: Tensor, has_bias: bool) -> Tensor:
    return torch.cat([rows, torch.ones_like(rows[..., :1])], dim=-1) if has_bias else rows
