"""KFAC and EKFAC as drop-in optimizers: the plain loop with every default, on any model a user hands over."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acktr_kfe
from acktr_kfe import EKFAC, KFAC

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [pytest.param(KFAC, id="kfac"), pytest.param(EKFAC, id="ekfac")]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def statistics(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[torch.Tensor]:
    tensors = []
    for layer in (model[0], model[2]):
        state = optimizer.state[layer.weight]
        tensors += [state["A"], state["G"]] + ([state["scale"]] if "scale" in state else [])
    return tensors


@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
@pytest.mark.parametrize("cls", CLASSES)
def test_accumulated_micro_batches_give_the_statistics_of_the_combined_batch(cls: type, curvature: str) -> None:
    x, y = data()
    options = {"factor_update_interval": 1, "eigen_update_interval": 1, "curvature": curvature}
    if cls is EKFAC:
        options["scale_update_interval"] = 1
    x = x.double()
    whole_model, split_model = mlp().double(), mlp().double()
    whole, split = cls(whole_model, **options), cls(split_model, **options)
    with torch.no_grad():
        probabilities = F.softmax(whole_model(x), -1)
    sampled = torch.multinomial(probabilities, 1, generator=torch.Generator().manual_seed(0)).squeeze(1)

    def backward(optimizer: torch.optim.Optimizer, model: nn.Module, part: slice, parts: int) -> None:
        """The standard accumulation recipe: each micro-batch's mean loss divided by the number of parts."""
        logits = model(x[part])
        if curvature == "fisher":
            optimizer.curvature_backward(F.cross_entropy(logits, sampled[part]) / parts, retain_graph=True)
        (F.cross_entropy(logits, y[part]) / parts).backward()

    backward(whole, whole_model, slice(0, 32), 1)
    for part in (slice(0, 16), slice(16, 32)):
        backward(split, split_model, part, 2)
    whole.step()
    split.step()
    for a, b in zip(statistics(whole, whole_model), statistics(split, split_model)):
        torch.testing.assert_close(a, b)
    for p, q in zip(whole_model.parameters(), split_model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("cls", CLASSES)
def test_layer_applied_twice_in_one_loss_is_not_taken_for_accumulation(cls: type) -> None:
    """Two forwards before one backward (a shared encoder) form one micro-batch: each example counts once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    head = nn.Linear(12, 4)
    optimizer = cls(nn.ModuleList([model, head]), factor_update_interval=1, eigen_update_interval=1)
    x, y = data()
    F.cross_entropy(head(torch.cat([model(x), model(x.flip(0))], 1)), y).backward()
    records = optimizer._capture.pop_records()
    assert {record.generation for record in records[model[0]]} == {0}


def plain_loop(optimizer: torch.optim.Optimizer, model: nn.Module, steps: int, loss_scale: float = 1.0) -> list[float]:
    """The README's first loop: zero_grad, loss.backward(), step(); returns the unscaled losses."""
    losses = []
    for step in range(steps):
        x, y = data(seed=step)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (loss_scale * loss).backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls", CLASSES)
def test_default_step_does_not_depend_on_the_units_of_the_loss(cls: type) -> None:
    """Relative damping and Adam-length steps: a loss multiplied by 0.01 or 100 trains along the same path."""
    paths = []
    for scale in (1e-2, 1.0, 1e2):
        model = mlp().double()
        optimizer = cls(model)
        generator = torch.Generator().manual_seed(0)
        for _ in range(30):
            x, y = torch.randn(32, 6, generator=generator).double(), torch.randint(0, 4, (32,), generator=generator)
            optimizer.zero_grad()
            (scale * F.cross_entropy(model(x), y)).backward()
            optimizer.step()
        paths.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    # Adam's epsilon (1e-8) is the only quantity with units left: it is negligible against these gradients.
    torch.testing.assert_close(paths[0], paths[1], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(paths[2], paths[1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
def test_bf16_autocast_trains_with_statistics_kept_in_float32(cls: type) -> None:
    model = mlp()
    optimizer = cls(model, curvature="fisher")
    for step in range(12):
        x, y = data(seed=step)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            optimizer.curvature_backward(acktr_kfe.softmax_fisher_loss(logits), retain_graph=True)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
    state = optimizer.state[model[0].weight]
    assert state["A"].dtype == state["G"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.steps == 12


@pytest.mark.parametrize("curvature", ["empirical", "fisher", "gauss_newton", "ief"])
def test_compiled_model_records_curvature_for_every_source(curvature: str) -> None:
    model = mlp()
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = EKFAC(model, curvature=curvature, factor_update_interval=1, scale_update_interval=1)
    for step in range(3):
        x, y = data(seed=step)
        optimizer.zero_grad()
        logits = compiled(x)
        loss = F.cross_entropy(logits, y)
        if curvature == "fisher":
            optimizer.curvature_backward(acktr_kfe.softmax_fisher_loss(logits), retain_graph=True)
        elif curvature == "gauss_newton":
            optimizer.curvature_backward(acktr_kfe.gauss_newton_loss(logits.sum(1)), retain_graph=True)
        if curvature == "ief":
            optimizer.curvature_backward(loss, logits=logits, accumulate_grad=True)
        else:
            loss.backward()
        optimizer.step()
    assert optimizer.steps == 3
    assert "scale" in optimizer.state[model[2].weight]


def test_warning_points_at_the_users_line() -> None:
    model = mlp()
    optimizer = EKFAC(model)
    F.cross_entropy(model(data()[0]), data()[1]).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient") as caught:
        optimizer.step()
    assert Path(caught[0].filename).resolve() == Path(__file__).resolve()


def test_growing_parameter_norm_is_reported_while_still_finite() -> None:
    model = mlp()
    optimizer = EKFAC(model, lr=50.0, step_norm="natural", factor_update_interval=1)
    for _ in range(30):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain_loop(optimizer, model, 1)
        if any("parameter norm grew" in str(w.message) for w in caught):
            break
    else:
        pytest.fail("no growth warning in 30 diverging steps")
    assert all(torch.isfinite(p).all() for p in model.parameters()), "non-finite before the warning"


def test_parameters_exempt_from_the_growth_warning_may_be_rescaled_without_a_warning() -> None:
    """A parameter rescaled on purpose (a value head kept in units of its targets' scale) is left out of the watched
    norm; the others are still watched."""
    for exempt, rescaled, warned in ((True, 2, False), (True, 0, True), (False, 2, True)):
        model = mlp()
        optimizer = EKFAC(model, lr=1e-4)
        if exempt:
            optimizer.exempt_from_growth_warning(model[2].parameters())
        plain_loop(optimizer, model, 1)
        with torch.no_grad():
            model[rescaled].weight.mul_(1000.0)
            model[rescaled].bias.mul_(1000.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain_loop(optimizer, model, 1)
        assert any("parameter norm grew" in str(w.message) for w in caught) == warned, (exempt, rescaled)


@pytest.mark.parametrize("cls", CLASSES)
def test_defaults_train_a_classifier_below_adam_without_diverging(cls: type) -> None:
    """The short version of scripts/bench_dropin.py: every default, the plain loop, against Adam's defaults."""
    generator = torch.Generator().manual_seed(0)
    # Correlated inputs of scales from 0.03 to 10 (a rotation of independent features), labels from a tanh teacher.
    rotation, _ = torch.linalg.qr(torch.randn(20, 20, generator=generator))
    latent = torch.randn(2048, 20, generator=generator)
    inputs = (latent * torch.logspace(-1.5, 1, 20)) @ rotation
    labels = (
        torch.tanh(latent @ torch.randn(20, 32, generator=generator)) @ torch.randn(32, 3, generator=generator)
    ).argmax(1)

    def run(make_optimizer) -> float:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
        optimizer = make_optimizer(model)
        batches = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(200):
            index = torch.randint(2048, (64,), generator=batches)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs[index]), labels[index])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert all(torch.isfinite(p).all() for p in model.parameters())
        return sum(losses[-20:]) / 20

    adam = run(lambda model: torch.optim.Adam(model.parameters()))
    kronecker = run(cls)
    assert kronecker < adam


def test_fp16_autocast_with_a_grad_scaler_follows_the_float32_run() -> None:
    """GradScaler multiplies the recorded output gradients by its scale; the default step (relative damping,
    Adam-length) does not depend on that factor, so the fp16 run follows the float32 one."""

    def run(mixed: bool) -> torch.Tensor:
        model = mlp()
        optimizer = EKFAC(model, factor_update_interval=1, scale_update_interval=1, eigen_update_interval=5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14) if mixed else None
        for step in range(40):
            x, y = data(seed=step)
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=mixed):
                loss = F.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        assert optimizer.steps == 40
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    torch.testing.assert_close(run(True), run(False), rtol=0.0, atol=1e-2)


def test_bench_dropin_writes_a_table_and_a_plot(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_dropin", ROOT / "scripts" / "bench_dropin.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_dropin"] = bench  # its dataclass looks the module up
    spec.loader.exec_module(bench)
    results = bench.main(
        ["--tasks", "regression", "--steps", "5", "--optimizers", "adam", "ekfac", "--out", str(tmp_path)]
    )
    assert set(results["regression"]) == {"adam", "ekfac"}
    assert results["regression"]["ekfac"]["diverged_at"] is None
    table = (tmp_path / "results.md").read_text()
    assert "| regression | 5 |" in table
    assert (tmp_path / "loss.png").stat().st_size > 0
