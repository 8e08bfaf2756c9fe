"""Supervised benchmark mode: CIFAR-10 reader, augmentation, checksum-verified downloads (offline), the models,
one training step per optimizer, and the two scripts end to end on small files written in the canonical formats."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.supervised import build_optimizer
from agents.supervised.data import DatasetFilesMissingError, augment_cifar, load_cifar10, read_cifar_batch
from agents.supervised.download import ChecksumError, download_cifar10, download_mnist, fetch_verified
from agents.supervised.models import VGG11, MNISTAutoencoder, ResNet34
from agents.supervised.runner import TASKS, evaluate, train_run
from agents.supervised.training import OPTIMIZER_NAMES

from .test_train_script import load_script

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """A CIFAR-10 python batch as the original files hold it: bytes keys, (n, 3072) uint8, list of labels."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    with path.open("wb") as handle:
        pickle.dump({b"batch_label": b"test", b"labels": labels, b"data": data, b"filenames": []}, handle)
    return data, labels


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_cifar_batch(folder / "data_batch_1", 40, seed=1)
    write_cifar_batch(folder / "data_batch_2", 24, seed=2)
    write_cifar_batch(folder / "test_batch", 30, seed=3)
    return folder


# --- data ----------------------------------------------------------------------------------------------------
def test_cifar_reader_reads_canonical_batches_channel_major(cifar_dir: Path) -> None:
    data, labels = write_cifar_batch(cifar_dir / "data_batch_3", 5, seed=4)
    images, read_labels = read_cifar_batch(cifar_dir / "data_batch_3")
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.uint8
    # Channel-major rows: the first 1024 values are the red plane, row by row.
    np.testing.assert_array_equal(images[2, 0], data[2, :1024].reshape(32, 32))
    np.testing.assert_array_equal(images[2, 2, 31], data[2, 3072 - 32 :])
    np.testing.assert_array_equal(read_labels, labels)


def test_load_cifar10_joins_present_train_batches_and_finds_the_folder_from_its_parent(cifar_dir: Path) -> None:
    raw_x, raw_y = load_cifar10(cifar_dir.parent, "train", normalize=False)
    assert raw_x.shape == (64, 3, 32, 32) and raw_y.shape == (64,)
    assert float(raw_x.min()) >= 0.0 and float(raw_x.max()) <= 1.0
    test_x, _ = load_cifar10(cifar_dir, "test")
    assert test_x.shape == (30, 3, 32, 32) and test_x.dtype == torch.float32
    with pytest.raises(ValueError, match="Invalid split: 'valid'"):
        load_cifar10(cifar_dir, "valid")


def test_cifar_missing_and_corrupted_files_raise_clear_errors(tmp_path: Path, cifar_dir: Path) -> None:
    with pytest.raises(DatasetFilesMissingError, match=r"data_batch_1 or .*download_data.py cifar10"):
        load_cifar10(tmp_path / "empty", "train")
    (cifar_dir / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read CIFAR python batch"):
        load_cifar10(cifar_dir, "test")
    with (cifar_dir / "test_batch").open("wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(ValueError, match=r"expected \(N, 3072\) uint8"):
        load_cifar10(cifar_dir, "test")


def test_shared_cifar_subset_loads_when_present() -> None:
    if not (SHARED / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"CIFAR-10 batches not found in {SHARED} (the shared datasets folder beside the repository)")
    images, labels = load_cifar10(SHARED, "train")
    assert images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(labels).tolist() == [1000] * 10
    # Standardized with the CIFAR-10 statistics: near zero mean and unit spread per channel.
    assert images.mean((0, 2, 3)).abs().max() < 0.1 and (images.std((0, 2, 3)) - 1).abs().max() < 0.1


def test_augmentation_crops_a_shifted_window_and_flips() -> None:
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = augment_cifar(images, torch.Generator().manual_seed(0), padding=4)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (4,) * 4)
    for n in range(2):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(out[n], (lambda w: w.flip(-1) if flip else w)(padded[n, :, dy : dy + 32, dx : dx + 32]))
        ]
        assert len(matches) == 1
    flips = augment_cifar(images.repeat(50, 1, 1, 1), torch.Generator().manual_seed(1), padding=0)
    flipped = sum(not torch.equal(f, images[i % 2]) for i, f in enumerate(flips))
    assert 20 < flipped < 80


# --- downloads, offline --------------------------------------------------------------------------------------
def test_download_verifies_checksums_through_a_file_mirror(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    payload = b"IDX bytes"
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(payload)
    good = hashlib.md5(payload).hexdigest()
    target = tmp_path / "data" / "t10k-labels-idx1-ubyte.gz"
    fetch_verified(mirror.as_uri() + "/t10k-labels-idx1-ubyte.gz", target, good)
    assert target.read_bytes() == payload
    with pytest.raises(ChecksumError, match="does not match the published"):
        fetch_verified(mirror.as_uri() + "/t10k-labels-idx1-ubyte.gz", tmp_path / "bad.gz", "0" * 32)
    assert not (tmp_path / "bad.gz").exists() and not (tmp_path / "bad.gz.part").exists()
    with pytest.raises(ChecksumError):  # MNIST's published MD5 does not hold for these bytes
        download_mnist(tmp_path / "mnist", mirror.as_uri(), files=["t10k-labels-idx1-ubyte.gz"])
    with pytest.raises(ValueError, match="unknown MNIST files"):
        download_mnist(tmp_path / "mnist", mirror.as_uri(), files=["labels.gz"])


def test_download_of_real_mnist_test_files_passes_the_published_checksums(tmp_path: Path) -> None:
    source = SHARED / "mnist"
    if not (source / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST files not found in {source}")
    names = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    paths = download_mnist(tmp_path / "mnist", source.as_uri(), files=names)
    assert [p.name for p in paths] == names and all(p.stat().st_size > 0 for p in paths)


def test_cifar_download_extracts_a_verified_archive(tmp_path: Path, cifar_dir: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(cifar_dir, arcname="cifar-10-batches-py")
    (mirror / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(ChecksumError):
        download_cifar10(tmp_path / "out", mirror.as_uri())
    folder = download_cifar10(
        tmp_path / "out", mirror.as_uri(), expected_md5=hashlib.md5(buffer.getvalue()).hexdigest()
    )
    assert load_cifar10(folder, "test")[0].shape == (30, 3, 32, 32)


def test_download_script_reports_failures_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = load_script("download_data")
    assert script.main(["mnist", "--data-dir", str(tmp_path), "--mirror", (tmp_path / "nowhere").as_uri()]) == 1
    assert "error:" in capsys.readouterr().err


# --- models and one step per optimizer -----------------------------------------------------------------------
def test_autoencoder_sparse_initialization_gives_each_unit_fifteen_gaussian_inputs() -> None:
    torch.manual_seed(0)
    layers = [m for m in MNISTAutoencoder().modules() if isinstance(m, torch.nn.Linear)]
    for layer in layers:
        nonzero = (layer.weight != 0).sum(dim=1)
        assert torch.equal(nonzero, torch.full_like(nonzero, min(15, layer.in_features)))
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    weights = torch.cat([layer.weight[layer.weight != 0] for layer in layers])
    assert abs(weights.std().item() - 1.0) < 0.05 and abs(weights.mean().item()) < 0.05
    torch.manual_seed(0)
    default = MNISTAutoencoder(init="default")[0].weight
    assert (default != 0).all() and default.abs().max() <= 784**-0.5
    with pytest.raises(ValueError, match=r"Invalid init: 'xavier'\. Valid values: sparse, default"):
        MNISTAutoencoder(init="xavier")


def test_full_size_models_have_the_published_sizes_and_forward_cifar_images() -> None:
    images = torch.randn(2, 3, 32, 32)
    for model, parameters in ((VGG11(), 9_225_610), (VGG11(batch_norm=True), 9_228_362), (ResNet34(), 21_282_122)):
        assert sum(p.numel() for p in model.parameters()) == parameters
        assert model(images).shape == (2, 10)


@pytest.mark.parametrize("optimizer_name", OPTIMIZER_NAMES)
@pytest.mark.parametrize(
    ("task_name", "model"),
    [
        ("mnist_autoencoder", None),
        ("cifar10_vgg11", lambda: VGG11(width=8)),
        ("cifar10_vgg11_bn", lambda: VGG11(width=8, batch_norm=True)),
        ("cifar10_resnet34", lambda: ResNet34(width=8)),
    ],
)
def test_one_training_step_per_optimizer_moves_every_parameter_and_stays_finite(
    task_name: str, model, optimizer_name: str
) -> None:
    task = TASKS[task_name]
    torch.manual_seed(0)
    net = task.build_model() if model is None else model()
    optimizer = build_optimizer(optimizer_name, net, task_name)
    if task.dataset == "mnist":
        x = torch.rand(16, 784)
        y = x
    else:
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    before = [p.detach().clone() for p in net.parameters()]
    optimizer.zero_grad()
    output = net(x)
    loss = task.loss(output, y)
    if optimizer_name not in ("sgd", "adam"):
        optimizer.curvature_backward(task.fisher_loss(output), retain_graph=True)
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert changed == len(before)
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert np.isfinite(evaluate(net, task, x, y, batch_size=8)["eval_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["cifar10_vgg11", "cifar10_resnet34"])
@pytest.mark.parametrize("optimizer_name", ["kfac", "ekfac"])
def test_full_size_kronecker_step(task_name: str, optimizer_name: str) -> None:
    task = TASKS[task_name]
    net = task.build_model()
    optimizer = build_optimizer(optimizer_name, net, task_name)
    output = net(torch.randn(4, 3, 32, 32))
    optimizer.curvature_backward(task.fisher_loss(output), retain_graph=True)
    task.loss(output, torch.randint(0, 10, (4,))).backward()
    optimizer.step()
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())


# --- scripts -------------------------------------------------------------------------------------------------
def test_supervised_script_writes_step_and_epoch_csvs_tensorboard_and_config(cifar_dir: Path, tmp_path: Path) -> None:
    script = load_script("supervised")
    log_dir = tmp_path / "run"
    argv = ["--task", "cifar10_vgg11_bn", "--optimizer", "ekfac", "--epochs", "2", "--batch-size", "16", "--width", "8"]
    argv += ["--data-dir", str(cifar_dir.parent), "--log-dir", str(log_dir), "--augment", "--no-progress"]
    assert script.main(argv) == 0
    with (log_dir / "steps.csv").open() as handle:
        steps = list(csv.DictReader(handle))
    assert len(steps) == 2 * (64 // 16)
    seconds = [float(s["wall_clock_s"]) for s in steps]
    assert seconds == sorted(seconds) and seconds[0] > 0
    with (log_dir / "epochs.csv").open() as handle:
        epochs = list(csv.DictReader(handle))
    assert [e["epoch"] for e in epochs] == ["1", "2"]
    assert 0.0 <= float(epochs[-1]["eval_accuracy"]) <= 1.0
    assert any((log_dir / "tb").iterdir())
    assert "optimizer: ekfac" in (log_dir / "config.yml").read_text()


def test_supervised_script_rejects_bad_input_before_training(
    cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    script = load_script("supervised")
    common = ["--task", "cifar10_vgg11", "--log-dir", str(tmp_path / "run"), "--no-progress"]
    assert script.main([*common, "--data-dir", str(tmp_path / "none")]) == 2
    assert "CIFAR-10 train files missing" in capsys.readouterr().err
    assert script.main([*common, "--data-dir", str(cifar_dir), "--lr", "-1"]) == 2
    assert "Invalid lr: -1" in capsys.readouterr().err
    assert script.main([*common, "--data-dir", str(cifar_dir), "--optimizer", "adam", "--damping", "0.1"]) == 2
    assert "--damping applies to kfac" in capsys.readouterr().err
    assert script.main([*common, "--data-dir", str(cifar_dir), "--task", "mnist_autoencoder", "--width", "8"]) == 2
    assert "Invalid width: 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--task", "imagenet"])


def test_divergence_raises_with_the_step_and_advice(cifar_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"training loss is (nan|inf).* at step \d+.*lower the learning rate"):
        train_run(
            "cifar10_vgg11",
            "sgd",
            data_dir=cifar_dir,
            log_dir=tmp_path / "run",
            epochs=3,
            batch_size=16,
            lr=1e6,
            width=8,
            progress=False,
        )


def test_compare_optimizers_writes_plot_and_table(cifar_dir: Path, tmp_path: Path) -> None:
    script = load_script("compare_optimizers")
    out = tmp_path / "compare"
    argv = ["--task", "cifar10_vgg11_bn", "--optimizers", "sgd", "adam", "ekfac", "--epochs", "1", "--width", "8"]
    argv += ["--batch-size", "16", "--data-dir", str(cifar_dir.parent), "--out", str(out), "--no-progress"]
    assert script.main(argv) == 0
    table = (out / "results.md").read_text()
    assert table.count("\n") == 5 and "| adam |" in table and "| ekfac |" in table
    assert (out / "loss.png").stat().st_size > 10_000
    assert script.main([*argv, "--report", "--target", "1e9"]) == 0


# --- faults and bad input (docs/FAILURE_BEHAVIOUR.md) ---------------------------------------------------------
def _settings_with(tmp_path: Path, task: str, optimizer: str, options: str) -> Path:
    """A copy of configs/supervised.yml whose ``task`` section gives ``optimizer`` other options."""
    import yaml

    from agents.supervised.training import CONFIG_PATH

    data = yaml.safe_load(CONFIG_PATH.read_text())
    data[task]["optimizers"][optimizer] = yaml.safe_load(options)
    path = tmp_path / "settings.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _quick(cifar_dir: Path) -> list[str]:
    return ["--task", "cifar10_vgg11", "--width", "8", "--batch-size", "16", "--data-dir", str(cifar_dir.parent),
            "--no-progress"]  # fmt: skip


def test_supervised_run_into_the_folder_of_an_earlier_run_refuses_and_leaves_it_as_it_was(
    cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    script = load_script("supervised")
    log_dir = tmp_path / "run"
    assert script.main([*_quick(cifar_dir), "--optimizer", "sgd", "--epochs", "1", "--log-dir", str(log_dir)]) == 0
    before = {p.name: p.read_bytes() for p in log_dir.iterdir() if p.is_file()}
    assert script.main([*_quick(cifar_dir), "--optimizer", "adam", "--epochs", "1", "--log-dir", str(log_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in log_dir.iterdir() if p.is_file()} == before


def test_supervised_learning_rate_that_would_overflow_is_refused_naming_the_flag(
    cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    script = load_script("supervised")
    argv = [*_quick(cifar_dir), "--optimizer", "adam", "--log-dir", str(tmp_path / "run")]
    assert script.main([*argv, "--lr", "1e38"]) == 2
    assert "Invalid lr: 1e+38 (must be a finite number in (0, 1e+06])" in capsys.readouterr().err
    assert script.main([*argv, "--lr", "nan"]) == 2
    assert "Invalid lr: nan" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [("{lr: abc}", r"invalid lr: 'abc'"), ("{lr: 0.1, momentum: 1.5}", r"invalid momentum: 1.5"),
     ("{lr: 0.1, bogus: 1}", r"bogus")],
)  # fmt: skip
def test_supervised_settings_file_value_of_wrong_type_or_range_names_the_file_and_key(
    cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, options: str, message: str
) -> None:
    settings = _settings_with(tmp_path, "cifar10_vgg11", "sgd", options)
    argv = [*_quick(cifar_dir), "--optimizer", "sgd", "--config", str(settings), "--log-dir", str(tmp_path / "run")]
    assert load_script("supervised").main(argv) == 2
    error = capsys.readouterr().err
    assert "settings.yml, cifar10_vgg11.optimizers.sgd" in error
    assert re.search(message, error)


def test_supervised_divergence_keeps_the_logs_up_to_it_and_advises_the_scripts_own_flags(
    cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    log_dir = tmp_path / "run"
    argv = [*_quick(cifar_dir), "--optimizer", "sgd", "--lr", "1e6", "--epochs", "3", "--log-dir", str(log_dir)]
    assert load_script("supervised").main(argv) == 1
    error = capsys.readouterr().err
    assert "lower --lr" in error and "--damping" not in error
    step = json.loads((log_dir / "diverged.json").read_text())["step"]
    with (log_dir / "steps.csv").open() as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == list(range(1, step))


def test_compare_records_a_diverged_optimizer_as_a_result_and_goes_on(
    cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    script = load_script("compare_optimizers")
    out = tmp_path / "compare"
    settings = _settings_with(tmp_path, "cifar10_vgg11", "sgd", "{lr: 1.0e+6}")
    argv = [*_quick(cifar_dir), "--optimizers", "sgd", "adam", "--epochs", "3", "--out", str(out)]
    assert script.main([*argv, "--config", str(settings)]) == 0
    printed = capsys.readouterr().out
    step = json.loads((out / "sgd" / "diverged.json").read_text())["step"]
    table = (out / "results.md").read_text()
    assert f"| sgd | diverged at step {step} |" in table
    assert re.search(r"\| adam \| \d", table), "the optimizer after the diverged one ran"
    assert (out / "loss.png").stat().st_size > 10_000
    flags = set(re.findall(r"(--[a-z][a-z-]*)", printed))
    parser_flags = {"--config", "--out", "--report", "--optimizers", "--target", "--task", "--epochs"}
    assert flags and flags <= parser_flags, f"advice names flags the script lacks: {flags - parser_flags}"
    (out / "results.md").unlink()
    assert script.main([*argv, "--report"]) == 0
    assert (out / "results.md").read_text() == table


def test_compare_into_an_existing_out_folder_refuses_naming_report(
    cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "compare"
    (out / "adam").mkdir(parents=True)
    (out / "adam" / "epochs.csv").write_text("epoch\n1\n")
    argv = [*_quick(cifar_dir), "--optimizers", "adam", "--epochs", "1", "--out", str(out)]
    assert load_script("compare_optimizers").main(argv) == 2
    error = capsys.readouterr().err
    assert "already holds a run" in error and "--report" in error and "fresh --out" in error
    assert [p.name for p in (out / "adam").iterdir()] == ["epochs.csv"]


def test_supervised_run_into_a_folder_in_use_refuses_naming_the_pid(
    cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import os

    from agents.run_folder import RunLock

    log_dir = tmp_path / "run"
    with RunLock(log_dir):
        argv = [*_quick(cifar_dir), "--optimizer", "sgd", "--epochs", "1", "--log-dir", str(log_dir)]
        assert load_script("supervised").main(argv) == 2
    assert f"in use by another run (PID {os.getpid()})" in capsys.readouterr().err
    assert list(log_dir.iterdir()) == []


def test_supervised_settings_file_with_a_key_given_twice_is_refused_naming_it(tmp_path: Path) -> None:
    from agents.supervised.training import task_config

    settings = tmp_path / "settings.yml"
    settings.write_text("mnist_autoencoder:\n  batch_size: 100\n  batch_size: 1000\n  optimizers: {sgd: {lr: 0.1}}\n")
    with pytest.raises(ValueError, match=r"settings\.yml: not valid YAML: the key 'batch_size' is given twice"):
        task_config("mnist_autoencoder", settings)
    # A merge key ("<<: *anchor", which configs/supervised.yml uses) may still be overridden by an explicit key.
    settings.write_text(
        "base: &base {batch_size: 100, epochs: 2}\n"
        "mnist_autoencoder:\n  <<: *base\n  batch_size: 1000\n  optimizers: {sgd: {lr: 0.1}}\n"
    )
    assert task_config("mnist_autoencoder", settings)["batch_size"] == 1000
    # A merged mapping that itself merges and overrides is not a repeat either, and an unhashable key is invalid YAML.
    settings.write_text(
        "mnist_autoencoder: {optimizers: {kfac: &k {lr: 0.3, damping: 0.001}, ekfac: &e {<<: *k, damping: 0.01}}}\n"
        "other: {<<: *e, lr: 0.5}\n"
    )
    assert task_config("mnist_autoencoder", settings)["optimizers"]["ekfac"] == {"lr": 0.3, "damping": 0.01}
    settings.write_text("? [a, b]\n: 1\n")
    with pytest.raises(ValueError, match=r"(?s)settings\.yml: not valid YAML: .*unhashable key"):
        task_config("mnist_autoencoder", settings)
    assert set(task_config("cifar10_vgg11")["optimizers"]) >= {"sgd", "ekfac"}


@pytest.mark.parametrize("text", ["- mnist_autoencoder\n", "mnist_autoencoder\n", "batch_size: [1\n"])
def test_supervised_settings_file_that_is_not_a_mapping_of_tasks_is_refused_naming_it_before_training(
    tmp_path: Path, text: str
) -> None:
    # A list, a bare string (where `task in data` would be a substring test) and broken YAML: each names the file,
    # through task_config and through train_run, which refuses it before it reads data or writes the log folder.
    from agents.supervised.training import task_config

    settings = tmp_path / "settings.yml"
    settings.write_text(text)
    with pytest.raises(ValueError, match=r"settings\.yml: (not valid YAML|expected a mapping of task sections)"):
        task_config("mnist_autoencoder", settings)
    log_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"settings\.yml: (not valid YAML|expected a mapping of task sections)"):
        train_run("mnist_autoencoder", "sgd", data_dir=tmp_path / "no-data", log_dir=log_dir, config_path=settings)
    assert not log_dir.exists()
