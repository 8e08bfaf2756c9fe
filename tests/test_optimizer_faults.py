"""KFAC and EKFAC under numerical faults and bad input: what reaches the parameters, what is counted, what is said.

Each test names the behaviour it checks; docs/FAILURE_BEHAVIOUR.md ("Optimizer") lists them with the guarantee.
Models are tiny and runs short: the whole file takes a few seconds on one CPU core.
"""

from __future__ import annotations

import copy
import linecache
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acktr_kfe
from acktr_kfe import EKFAC, KFAC, KroneckerPreconditioner

# Tiny tensors: torch's intra-op threads only contend with each other (and with other processes) on them.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CURVATURES = ["empirical", "fisher", "gauss_newton", "ief"]


# --- helpers -------------------------------------------------------------------------------------------------
def make_model(curvature: str = "empirical", seed: int = 0) -> nn.Sequential:
    """Two linear layers; a scalar head for Gauss-Newton (a regression), four classes otherwise."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1 if curvature == "gauss_newton" else 4))


def make_batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def backward(
    optimizer: KroneckerPreconditioner, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0
) -> None:
    """The forward and the backward passes the optimizer's curvature asks for (README, "Using the preconditioners").

    The Gauss-Newton model trains on a Huber loss, whose output gradient stays bounded: inputs near 1e20 then give
    finite gradients (about 1e20) whose squares overflow, the case the optimizer has to catch itself.
    """
    output = model(x)
    curvature = optimizer.curvature.value
    if curvature == "gauss_newton":
        prediction = output.squeeze(-1)
        optimizer.curvature_backward(acktr_kfe.gauss_newton_loss(prediction), retain_graph=True)
        F.huber_loss(prediction, y.to(prediction.dtype)).backward()
    elif curvature == "fisher":
        generator = torch.Generator().manual_seed(seed)
        optimizer.curvature_backward(acktr_kfe.softmax_fisher_loss(output, generator=generator), retain_graph=True)
        F.cross_entropy(output, y).backward()
    elif curvature == "ief":
        optimizer.curvature_backward(F.cross_entropy(output, y), logits=output, accumulate_grad=True)
    else:
        F.cross_entropy(output, y).backward()


def train_step(
    optimizer: KroneckerPreconditioner, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0
) -> None:
    optimizer.zero_grad()
    backward(optimizer, model, x, y, seed)
    optimizer.step()  # the user's line: warnings must point here


def fast(cls: type, **options) -> dict:
    """Statistics, basis and scale on every step or two, so that a few steps reach every code path."""
    options = {"factor_update_interval": 1, "eigen_update_interval": 2, **options}
    if cls is EKFAC:
        options.setdefault("scale_update_interval", 1)
    return options


def regions(model: nn.Sequential, layout: str, max_kl: float) -> dict:
    if layout == "one-region":
        return {"max_kl": max_kl}
    return {"trust_regions": [(list(model[0].parameters()), max_kl), (list(model[2].parameters()), max_kl)]}


def snapshot(optimizer: KroneckerPreconditioner) -> dict:
    """A copy of everything the optimizer saves (tensors cloned)."""
    return copy.deepcopy(optimizer.state_dict())


def assert_same(saved: object, now: object, where: str = "state") -> None:
    """Bitwise equality of two (nested) optimizer states."""
    if isinstance(saved, torch.Tensor):
        assert isinstance(now, torch.Tensor) and saved.dtype == now.dtype, where
        assert torch.equal(saved, now), where
    elif isinstance(saved, dict):
        assert isinstance(now, dict) and set(saved) == set(now), f"{where}: {set(saved) ^ set(now)}"
        for key in saved:
            assert_same(saved[key], now[key], f"{where}[{key!r}]")
    elif isinstance(saved, list | tuple):
        assert isinstance(now, list | tuple) and len(saved) == len(now), where
        for index, (a, b) in enumerate(zip(saved, now)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert saved == now, f"{where}: {saved!r} != {now!r}"


KEPT = ("A", "G", "factor_updates", "momentum_buffer", "adam_exp_avg", "adam_exp_avg_sq")


def kept(state: dict) -> dict:
    """The part of a saved state that a skipped step must leave as it was."""
    return {i: {k: v for k, v in s.items() if k in KEPT} for i, s in state["state"].items()}


def parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def norm(model: nn.Module) -> float:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()]).norm().item()


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --- one batch whose squares overflow float32 -------------------------------------------------------------------
# step_norm="adam": the gradients (~1e19) are finite, so step() takes the batch. Adam's second moment (~1e35) and
# the momentum buffer (~1e21, whose norm overflows: grafted length 0) keep it: the parameters do not move for ~50
# steps, then follow the bad batch's direction for hundreds more. Nothing is skipped or counted.


def huge_batch_cases() -> list:
    cases = []
    for cls in (KFAC, EKFAC):
        for curvature in CURVATURES:
            for layout in ("one-region", "two-regions"):
                # The trust-region mode only changes the natural step (the grafted step is measured as taken).
                for mode in ("direction", "step"):
                    cases.append(pytest.param(cls, curvature, "natural", mode, layout))
                cases.append(pytest.param(cls, curvature, "adam", "direction", layout))
    return cases


@pytest.mark.parametrize(("cls", "curvature", "step_norm", "mode", "layout"), huge_batch_cases())
def test_batch_with_inputs_near_1e20_is_skipped_counted_and_warned_and_the_next_batch_trains_as_without_it(
    cls: type, curvature: str, step_norm: str, mode: str, layout: str
) -> None:
    def build() -> tuple[nn.Sequential, KroneckerPreconditioner]:
        model = make_model(curvature)
        options = fast(cls, curvature=curvature, step_norm=step_norm, trust_region_mode=mode)
        return model, cls(model, lr=0.05, **options, **regions(model, layout, 1e-3))

    model, optimizer = build()
    twin_model, twin = build()  # the same run without the bad batch
    for seed in range(2):
        train_step(optimizer, model, *make_batch(seed), seed=seed)
        train_step(twin, twin_model, *make_batch(seed), seed=seed)
    before, saved = parameters(model), snapshot(optimizer)

    x, y = make_batch(99)
    with pytest.warns(RuntimeWarning) as caught:
        train_step(optimizer, model, x * 1e20, y, seed=99)
    assert any("skipped" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert optimizer.skipped_steps == 1 and optimizer.steps == 2
    for p0, p in zip(before, model.parameters()):
        assert torch.equal(p0, p)  # unchanged, hence finite
    # The factors, the momentum and Adam's moments are untouched. (On an eigen-update step the bases may be
    # recomputed from the unchanged factors; the step counter stays, so the next step recomputes them anyway.)
    assert_same(kept(saved), kept(optimizer.state_dict()))

    for seed in range(2, 4):
        train_step(optimizer, model, *make_batch(seed), seed=seed)
        train_step(twin, twin_model, *make_batch(seed), seed=seed)
    assert optimizer.steps == 4 and optimizer.skipped_steps == 1
    assert torch.isfinite(optimizer.last_kl_clip_scales).all() and torch.isfinite(optimizer.last_predicted_kls).all()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


# --- load_state_dict --------------------------------------------------------------------------------------------
# Parameter indices in the state: 0, 1 = weight and bias of layer "0"; 2, 3 = weight and bias of layer "2".
CORRUPTIONS = {
    "scale of the wrong shape": (EKFAC, 0, "scale", lambda t: torch.ones(8, 6), r"scale of layer 0 has shape"),
    "scale holding NaN": (EKFAC, 2, "scale", lambda t: t.index_fill(0, torch.tensor([1]), math.nan), "scale of"),
    "momentum_buffer of the wrong shape": (
        EKFAC,
        2,
        "momentum_buffer",
        lambda t: torch.zeros(3, 3),
        r"momentum_buffer of layer 2 has shape \(3, 3\), expected \(4, 8\)",
    ),
    "bias momentum_buffer of the wrong shape": (
        KFAC,
        1,
        "momentum_buffer",
        lambda t: torch.zeros(3),
        r"momentum_buffer of a parameter of shape \(8,\)",
    ),
    "A holding NaN": (KFAC, 0, "A", lambda t: t.index_fill(0, torch.tensor([0]), math.nan), "A of layer 0 holds NaN"),
    "G holding Inf": (EKFAC, 2, "G", lambda t: t.index_fill(1, torch.tensor([2]), math.inf), "G of layer 2 holds"),
    "eigvecs_G holding NaN": (KFAC, 2, "eigvecs_G", lambda t: t * math.nan, "eigvecs_G of layer 2 holds NaN"),
    "eigvals_A as int64": (KFAC, 0, "eigvals_A", lambda t: t.long(), r"eigvals_A of layer 0 has dtype torch\.int64"),
    "momentum_buffer as int32": (EKFAC, 0, "momentum_buffer", lambda t: t.int(), r"momentum_buffer .*torch\.int32"),
    "adam_exp_avg_sq of the wrong shape": (KFAC, 2, "adam_exp_avg_sq", lambda t: t[:2], "adam_exp_avg_sq of layer 2"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_load_of_a_corrupted_tensor_raises_naming_the_key_and_leaves_the_optimizer_as_it_was(corruption: str) -> None:
    cls, index, key, corrupt, message = CORRUPTIONS[corruption]

    def build(steps: int) -> tuple[nn.Sequential, KroneckerPreconditioner]:
        model = make_model()
        optimizer = cls(model, lr=0.05, momentum=0.9, **fast(cls))
        for seed in range(steps):
            train_step(optimizer, model, *make_batch(seed))
        return model, optimizer

    _, source = build(2)
    state = snapshot(source)
    state["state"][index][key] = corrupt(state["state"][index][key])

    # The optimizer loading it is at another point of its run (3 steps), and so is its twin that loads nothing.
    model, optimizer = build(3)
    twin_model, twin = build(3)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=f"corrupted optimizer state: .*{message}") as error:
        optimizer.load_state_dict(state)
    assert key in str(error.value)
    assert_same(before, optimizer.state_dict())
    for seed in range(3, 5):
        train_step(optimizer, model, *make_batch(seed))
        train_step(twin, twin_model, *make_batch(seed))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_state_of_another_optimizer_or_another_model_is_refused_at_load() -> None:
    model = make_model()
    kfac = KFAC(model, **fast(KFAC))
    train_step(kfac, model, *make_batch(0))
    ekfac = EKFAC(make_model(), **fast(EKFAC))
    before = snapshot(ekfac)
    with pytest.raises(ValueError, match="cannot load KFAC into EKFAC"):
        ekfac.load_state_dict(kfac.state_dict())
    assert_same(before, ekfac.state_dict())
    with pytest.raises(ValueError, match="cannot load EKFAC into KFAC"):
        KFAC(make_model()).load_state_dict(ekfac.state_dict())

    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="cannot load a state without K-FAC counters into KFAC"):
        KFAC(make_model()).load_state_dict(adam.state_dict())

    torch.manual_seed(0)
    narrower = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    with pytest.raises(ValueError, match=r"G of layer 0 has shape \(8, 8\), expected \(5, 5\)"):
        KFAC(narrower).load_state_dict(kfac.state_dict())
    deeper = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="the state holds 4 parameters, the optimizer 6"):
        KFAC(deeper).load_state_dict(kfac.state_dict())


# --- batch size 1 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_batch_size_one_with_every_default_keeps_the_parameters_bounded_and_finite(cls: type) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = cls(model)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    start, largest = norm(model), 0.0
    for i in range(200):  # every example once, one at a time: single-example statistics are rank one
        optimizer.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        optimizer.step()
        assert all_finite(model), f"non-finite parameter after step {i}"
        largest = max(largest, norm(model))
    assert largest <= 10 * start, (start, largest)
    assert optimizer.steps == 200 and optimizer.skipped_steps == 0
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < math.log(3)  # it learned something


# --- warnings point at the user's line ------------------------------------------------------------------------------
def nan_gradient(cls: type) -> Callable[[], None]:
    model = make_model()
    optimizer = cls(model, **fast(cls))
    train_step(optimizer, model, *make_batch(0))
    x, y = make_batch(1)
    x[0, 0] = math.nan
    return lambda: train_step(optimizer, model, x, y)


def overflowing_statistics(cls: type) -> Callable[[], None]:
    model = make_model()
    optimizer = cls(model, step_norm="natural", max_kl=1e-3, **fast(cls))
    train_step(optimizer, model, *make_batch(0))
    x, y = make_batch(1)
    return lambda: train_step(optimizer, model, x * 1e20, y)


def layer_without_curvature(cls: type) -> Callable[[], None]:
    model = make_model()
    optimizer = cls(model, **fast(cls))
    model[2].eval()  # its forwards are not recorded: its gradient goes unpreconditioned, with a warning
    return lambda: train_step(optimizer, model, *make_batch(0))


def growing_parameters(cls: type) -> Callable[[], None]:
    model = make_model()
    optimizer = cls(model, lr=10.0, step_norm="natural", **fast(cls))

    def run() -> None:
        for seed in range(3):
            train_step(optimizer, model, *make_batch(seed))

    return run


def through_a_scheduler(cls: type) -> Callable[[], None]:
    model = make_model()
    optimizer = cls(model, **fast(cls))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)  # wraps optimizer.step in torch code
    train_step(optimizer, model, *make_batch(0))
    scheduler.step()
    x, y = make_batch(1)
    x[0, 0] = math.inf
    return lambda: train_step(optimizer, model, x, y)


def through_a_closure(cls: type) -> Callable[[], None]:
    model = make_model()
    optimizer = cls(model, **fast(cls))
    train_step(optimizer, model, *make_batch(0))
    x, y = make_batch(1)
    x[0, 0] = math.nan

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return lambda: optimizer.step(closure)  # the user's line


WARNING_SOURCES = {
    "non-finite gradient": (nan_gradient, "non-finite gradient"),
    "overflowing statistics": (overflowing_statistics, "the step was skipped"),
    "layer without curvature": (layer_without_curvature, "no curvature recorded yet for layer 2"),
    "parameter growth": (growing_parameters, "parameter norm grew"),
    "step wrapped by an LR scheduler": (through_a_scheduler, "non-finite gradient"),
    "step with a closure": (through_a_closure, "non-finite gradient"),
}


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("source", list(WARNING_SOURCES))
def test_warnings_point_at_the_users_line_that_called_step(source: str, cls: type) -> None:
    setup, expected = WARNING_SOURCES[source]
    run = setup(cls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any(expected in str(w.message) for w in runtime), [str(w.message) for w in runtime]
    for w in runtime:
        assert w.filename == __file__, (str(w.message), w.filename)
        assert ".step(" in linecache.getline(w.filename, w.lineno), (str(w.message), w.lineno)


# --- divergence is reported while it is still finite -----------------------------------------------------------------
def diverging_run(cls: type, **options) -> tuple[list[tuple[int, str]], int | None]:
    """A natural step with a learning rate far too large and no trust region: the warnings of each step and the
    first step at which a parameter, the parameter norm or the step itself stopped being finite."""
    model = make_model()
    optimizer = cls(model, lr=1.0, step_norm="natural", max_kl=None, **options)
    messages, first_fault = [], None
    for step in range(25):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                train_step(optimizer, model, *make_batch(step))
            except RuntimeError:
                first_fault = step if first_fault is None else first_fault
                break
        messages += [(step, str(w.message)) for w in caught]
        faulty = not all_finite(model) or not math.isfinite(norm(model)) or optimizer.skipped_steps > 0
        faulty = faulty or any("non-finite" in str(w.message) for w in caught)
        # The float32 sum of squares overflows beyond a norm of about 1.8e19: count that as non-finite too.
        faulty = faulty or norm(model) > 1e19
        if faulty and first_fault is None:
            first_fault = step
    return messages, first_fault


def first_growth_warning(messages: list[tuple[int, str]]) -> int | None:
    return next((step for step, message in messages if "parameter norm grew" in message), None)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_parameter_norm_growing_tenfold_is_warned_before_anything_is_non_finite(cls: type) -> None:
    messages, first_fault = diverging_run(cls, factor_update_interval=1)
    growth = first_growth_warning(messages)
    assert first_fault is not None, "the run was meant to diverge"
    assert growth is not None and growth < first_fault, (growth, first_fault, messages[:3])
    message = next(m for _, m in messages if "parameter norm grew" in m)
    # The advice fits the settings: natural steps with the default relative damping and no trust region.
    assert "lower lr, raise damping, use damping_scaling='absolute' with step_norm='natural' or set max_kl" in message


def test_divergence_advice_leaves_out_the_settings_already_in_use() -> None:
    options = {"lr": 1.0, "step_norm": "natural", "damping_scaling": "absolute", "max_kl": 1e-3}
    assert EKFAC(make_model(), **options)._divergence_advice() == "lower lr or raise damping"
    assert EKFAC(make_model())._divergence_advice() == "lower lr, raise damping or set max_kl"


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_parameter_norm_growing_tenfold_is_warned_in_time_with_the_default_intervals(cls: type) -> None:
    messages, first_fault = diverging_run(cls)
    growth = first_growth_warning(messages)
    assert first_fault is not None, "the run was meant to diverge"
    # Warned within a step or two of crossing 10x, long before the norm overflows.
    assert growth is not None and growth <= 2, (growth, first_fault)


# --- non-finite gradients ----------------------------------------------------------------------------------------
def poison_input(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[3, 2] = value
    return x


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["input", "one-bias-entry"])
@pytest.mark.parametrize("step_norm", ["adam", "natural"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_non_finite_gradient_is_skipped_with_a_warning_and_repeated_failures_raise(
    cls: type, step_norm: str, where: str, value: float
) -> None:
    model = make_model()
    optimizer = cls(model, lr=0.05, step_norm=step_norm, max_consecutive_failures=3, **fast(cls))
    for seed in range(2):
        train_step(optimizer, model, *make_batch(seed))
    before, saved = parameters(model), snapshot(optimizer)

    def bad_step() -> None:
        x, y = make_batch(7)
        optimizer.zero_grad()
        if where == "input":
            x = poison_input(x, value)
        backward(optimizer, model, x, y)
        if where == "one-bias-entry":
            model[2].bias.grad[1] = value
        optimizer.step()

    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="non-finite gradient"):
            bad_step()
    with pytest.raises(RuntimeError) as error:
        bad_step()
    message = str(error.value)
    assert f"{cls.__name__}: 3 consecutive numerical failures" in message
    assert "non-finite gradient" in message and "Check the loss and the learning rate" in message
    assert optimizer.skipped_steps == 3 and optimizer.steps == 2
    for p0, p in zip(before, model.parameters()):
        assert torch.equal(p0, p)
    assert_same(saved["state"], optimizer.state_dict()["state"])


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_failures_separated_by_a_good_step_do_not_accumulate(cls: type) -> None:
    model = make_model()
    optimizer = cls(model, lr=0.05, max_consecutive_failures=2, **fast(cls))
    train_step(optimizer, model, *make_batch(0))
    for seed in range(1, 5):
        x, y = make_batch(seed)
        with pytest.warns(RuntimeWarning, match="non-finite gradient"):
            train_step(optimizer, model, poison_input(x, math.nan), y)
        train_step(optimizer, model, x, y)  # a good step resets the count
    assert optimizer.skipped_steps == 4 and optimizer.steps == 5 and all_finite(model)


# --- what a demanding user does -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_step_without_backward_does_nothing(cls: type) -> None:
    model = make_model()
    optimizer = cls(model, **fast(cls))
    model(make_batch(0)[0])  # a forward, no backward
    assert optimizer.step() is None
    assert optimizer.steps == 0 and optimizer.skipped_steps == 0 and len(optimizer.state) == 0

    train_step(optimizer, model, *make_batch(1))
    before, saved = parameters(model), snapshot(optimizer)
    optimizer.zero_grad()
    optimizer.step()
    assert optimizer.steps == 1
    for p0, p in zip(before, model.parameters()):
        assert torch.equal(p0, p)
    assert_same(saved, optimizer.state_dict())


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_training_in_eval_mode_from_the_start_raises_naming_training_mode(cls: type) -> None:
    model = make_model().eval()
    optimizer = cls(model)
    with pytest.raises(RuntimeError, match=r"no curvature statistics were recorded .* in training mode"):
        train_step(optimizer, model, *make_batch(0))
    assert all_finite(model) and optimizer.steps == 0


@pytest.mark.parametrize("step_norm", ["adam", "natural"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_eval_mode_forwards_leave_the_statistics_alone_and_training_mode_resumes_them(
    cls: type, step_norm: str
) -> None:
    model = make_model()
    optimizer = cls(model, lr=0.05, step_norm=step_norm, **fast(cls))
    for seed in range(2):
        train_step(optimizer, model, *make_batch(seed))
    factors = {k: optimizer.state[model[0].weight][k].clone() for k in ("A", "G")}
    model.eval()
    before = parameters(model)
    for seed in range(2, 4):
        train_step(optimizer, model, *make_batch(seed))  # eval-mode backward: a step, with the curvature held
    assert optimizer.steps == 4 and all_finite(model)
    assert not torch.equal(before[0], model[0].weight)
    for key, value in factors.items():
        assert torch.equal(value, optimizer.state[model[0].weight][key])
    model.train()
    train_step(optimizer, model, *make_batch(4))
    assert not torch.equal(factors["A"], optimizer.state[model[0].weight]["A"])
    assert optimizer.skipped_steps == 0 and all_finite(model)


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        return self.a(x) + self.b(x) if use_b else self.a(x)


@pytest.mark.parametrize("step_norm", ["adam", "natural"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_layer_without_gradient_on_some_steps_stays_put_on_them_and_trains_on_the_others(
    cls: type, step_norm: str
) -> None:
    model = TwoBranches()
    optimizer = cls(model, lr=0.05, step_norm=step_norm, factor_update_interval=3, eigen_update_interval=6)
    for seed in range(14):
        use_b = seed % 4 == 1  # b is first reached at step 1, off the factor schedule
        before = model.b.weight.detach().clone()
        x, y = make_batch(seed)
        optimizer.zero_grad()  # set_to_none: b has no gradient on the steps that do not use it
        F.cross_entropy(model(x, use_b), y).backward()
        optimizer.step()
        assert torch.equal(before, model.b.weight) != use_b, seed
    assert optimizer.steps == 14 and optimizer.skipped_steps == 0 and all_finite(model)
    assert "eigvecs_A" in optimizer.state[model.b.weight]  # b got its curvature although reached late


@pytest.mark.parametrize("step_norm", ["adam", "natural"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_layer_frozen_after_construction_is_not_moved_and_the_rest_trains(cls: type, step_norm: str) -> None:
    model = make_model()
    optimizer = cls(model, lr=0.05, step_norm=step_norm, **fast(cls))
    for seed in range(2):
        train_step(optimizer, model, *make_batch(seed))
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen, head = parameters(model)[:2], model[2].weight.detach().clone()
    for seed in range(2, 6):
        train_step(optimizer, model, *make_batch(seed))
    assert all(torch.equal(p0, p) for p0, p in zip(frozen, model[0].parameters()))
    assert not torch.equal(head, model[2].weight)
    assert optimizer.steps == 6 and all_finite(model)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_float64_model_keeps_float64_statistics_and_trains(cls: type) -> None:
    model = make_model().double()
    optimizer = cls(model, lr=0.05, max_kl=1e-2, **fast(cls))
    for seed in range(4):
        x, y = make_batch(seed)
        train_step(optimizer, model, x.double(), y)
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.dtype == torch.float64 for t in tensors)
    assert optimizer.steps == 4 and all_finite(model)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_model_moved_to_float64_before_the_first_step_trains_in_float64(cls: type) -> None:
    model = make_model()
    optimizer = cls(model, lr=0.05, **fast(cls))
    model.double()  # the optimizer's parameters are the same tensors, now float64
    for seed in range(3):
        x, y = make_batch(seed)
        train_step(optimizer, model, x.double(), y)
    assert optimizer.state[model[0].weight]["A"].dtype == torch.float64
    assert optimizer.steps == 3 and all_finite(model)
