"""The one place where hooks are registered on a user's model, and removed.

A forward hook on each preconditioned layer saves the layer's input and registers a tensor hook on its output.
The tensor hook receives the gradient with respect to that output; if the capture is *armed* at that moment,
the pair (input, output gradient) is kept as a :class:`Record` until the optimizer's next step consumes it.

Why a tensor hook on the output rather than ``register_full_backward_hook``: full backward hooks wrap the
output in a custom autograd function, which makes a following ``ReLU(inplace=True)`` fail. A tensor hook that is
registered before an in-place operation receives the gradient with respect to the value *before* that
operation (PyTorch's documented hook semantics), which is the pre-activation gradient K-FAC needs.

The model is never modified: no module is wrapped or replaced; the only change is the hook handles, removed by
:meth:`StatisticsCapture.remove`. Hooks do nothing when the module is in eval mode, when gradients are disabled,
inside ``torch.func`` transforms, when the optimizer does not need statistics for its next step, or when the
capture is not armed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


@dataclass
class Record:
    """One backward pass through one call of a layer.

    Attributes:
        layer_input: the input the layer saw, detached (shares storage with autograd's saved copy).
        grad_output: the gradient of the recorded loss with respect to the layer's output.
        logit_grad_norms: per-example ``||d loss / d logits||`` of the same backward pass, shape ``(N,)``,
            for iEF curvature; ``None`` otherwise.
        generation: which micro-batch since the last step the record belongs to: a forward that follows a
            recorded backward starts a new one (gradient accumulation), while forwards before one backward share
            it (a layer applied twice in one loss).
    """

    layer_input: Tensor
    grad_output: Tensor
    logit_grad_norms: Tensor | None = None
    generation: int = 0


class StatisticsCapture:
    """Hooks on a set of modules that collect :class:`Record` objects while armed.

    Args:
        modules: the layers to watch.
        wants_statistics: called at each training forward; the hooks do nothing when it returns False.
        always_armed: record every backward pass (empirical curvature) instead of only those inside
            :meth:`recording`.
    """

    def __init__(
        self,
        modules: Iterable[nn.Module],
        *,
        wants_statistics: Callable[[], bool],
        always_armed: bool,
    ) -> None:
        self._wants_statistics = wants_statistics
        self.always_armed = always_armed
        self._depth = 0
        self._logit_grad_norms: Tensor | None = None
        self._records: dict[nn.Module, list[Record]] = {}
        self._generation = 0
        self._recorded_since_forward = False
        # The hooks hold only a weak reference, so that a dropped optimizer does not stay alive through the
        # model it was attached to (and its hooks turn into no-ops).
        self_ref = weakref.ref(self)

        # Run eagerly under torch.compile: whether a backward is recorded is decided when it runs (armed), not
        # when the forward was traced.
        @torch.compiler.disable
        def record_forward(module: nn.Module, inputs: tuple, output: object) -> None:
            capture = self_ref()
            if capture is not None:
                capture._on_forward(module, inputs, output)

        def forward_hook(module: nn.Module, inputs: tuple, output: object) -> None:
            # Eager forwards that cannot be recorded (evaluation mode, no gradients: every rollout step of an RL
            # agent) return here, before the call through torch.compiler.disable's wrapper, which costs about 13
            # microseconds a layer on a CPU (a fifth of a small policy's forward pass).
            if not torch.compiler.is_compiling() and not (module.training and torch.is_grad_enabled()):
                return
            record_forward(module, inputs, output)

        self._handles: list[RemovableHandle] = [m.register_forward_hook(forward_hook) for m in modules]

    @property
    def armed(self) -> bool:
        """Whether a backward pass happening now is recorded."""
        return self.always_armed or self._depth > 0

    def _on_forward(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        # Forwards inside torch.func transforms (vmap, grad) carry wrapped tensors that must not escape.
        if torch._C._are_functorch_transforms_active():
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return
        if not self._wants_statistics():
            return
        if self._recorded_since_forward:
            self._generation += 1
            self._recorded_since_forward = False
        generation = self._generation
        layer_input = inputs[0].detach()
        self_ref = weakref.ref(self)

        def output_hook(grad: Tensor) -> None:
            capture = self_ref()
            if capture is not None and capture.armed:
                record = Record(layer_input, grad.detach(), capture._logit_grad_norms, generation)
                capture._records.setdefault(module, []).append(record)
                capture._recorded_since_forward = True

        output.register_hook(output_hook)

    @contextlib.contextmanager
    def recording(self, logit_grad_norms: Tensor | None = None) -> Iterator[None]:
        """Arm the hooks for the backward passes run inside this block."""
        previous = self._logit_grad_norms
        self._depth += 1
        self._logit_grad_norms = logit_grad_norms
        try:
            yield
        finally:
            self._depth -= 1
            self._logit_grad_norms = previous

    def pop_records(self) -> dict[nn.Module, list[Record]]:
        """Hand over everything recorded since the last call, and forget it."""
        records, self._records = self._records, {}
        self._generation = 0
        self._recorded_since_forward = False
        return records

    def has_records(self) -> bool:
        return bool(self._records)

    def remove(self) -> None:
        """Remove every hook from the model and drop pending records."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()
