"""scripts/sb3_tests.py: SB3's test files rewritten for ACKTR and the plug-in, failures told apart from exclusions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("sb3_tests_script", ROOT / "scripts" / "sb3_tests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imports_are_rewritten_to_acktr_or_to_the_kronecker_algorithms() -> None:
    script = load_script()
    text = "import pytest\nfrom stable_baselines3 import A2C, PPO, SAC\n\nx = 1\n"
    assert script.rewrite_imports(text, "acktr") == (
        "import pytest\nfrom stable_baselines3 import PPO, SAC\nfrom agents import ACKTR as A2C\n\nx = 1\n"
    )
    assert script.rewrite_imports(text, "plugin") == (
        "import pytest\nfrom stable_baselines3 import SAC\n"
        "from _kron_algorithms import KA2C as A2C, KPPO as PPO\n\nx = 1\n"
    )
    assert script.rewrite_imports("from stable_baselines3 import A2C\n", "acktr") == "from agents import ACKTR as A2C\n"
    assert script.rewrite_imports("import numpy\n", "acktr") == "import numpy\n"


def test_imports_in_parentheses_and_every_import_statement_are_rewritten() -> None:
    script = load_script()
    text = "from stable_baselines3 import (\n    A2C,\n    SAC,\n)\nfrom stable_baselines3 import A2C\n"
    assert script.rewrite_imports(text, "acktr") == (
        "from stable_baselines3 import SAC\nfrom agents import ACKTR as A2C\nfrom agents import ACKTR as A2C\n"
    )
    # A file that imports neither class is left as it is.
    assert (
        script.rewrite_imports("from stable_baselines3 import SAC\n", "plugin") == "from stable_baselines3 import SAC\n"
    )


def test_aliases_comments_and_indented_imports_are_rewritten_in_place() -> None:
    script = load_script()
    text = (
        "from stable_baselines3 import SAC, A2C as Algo  # noqa: F401\n"
        "def f():\n"
        "    from stable_baselines3 import A2C, DQN, PPO  # noqa: F401\n"
        "    return A2C\n"
        "from stable_baselines3 import (  # the algorithms (A2C)\n"
        "    A2C,  # on-policy\n"
        "    SAC,\n"
        ")\n"
        "from stable_baselines3.common.env_util import make_vec_env  # used with A2C\n"
    )
    assert script.rewrite_imports(text, "plugin") == (
        "from stable_baselines3 import SAC\n"
        "from _kron_algorithms import KA2C as Algo  # noqa: F401\n"
        "def f():\n"
        "    from stable_baselines3 import DQN\n"
        "    from _kron_algorithms import KA2C as A2C, KPPO as PPO  # noqa: F401\n"
        "    return A2C\n"
        "from stable_baselines3 import SAC\n"
        "from _kron_algorithms import KA2C as A2C\n"
        "from stable_baselines3.common.env_util import make_vec_env  # used with A2C\n"
    )


def test_a2c_reached_any_other_way_is_refused_rather_than_tested_in_the_projects_place() -> None:
    script = load_script()
    for text in (
        "from stable_baselines3.a2c import A2C\n",
        "from stable_baselines3.a2c import (\n    A2C,\n)\n",
        "import stable_baselines3\nm = stable_baselines3.A2C\n",
        "import stable_baselines3.a2c\nm = stable_baselines3.a2c.A2C\n",
        "import stable_baselines3 as sb\nm = sb.A2C\n",
        "from stable_baselines3 import *\n",
    ):
        with pytest.raises(ValueError, match="cannot rewrite"):
            script.rewrite_imports(text, "acktr")
    # PPO stays SB3's under the acktr target, so its other imports are fine there, not under the plug-in.
    assert script.rewrite_imports("from stable_baselines3.ppo import PPO\n", "acktr") == (
        "from stable_baselines3.ppo import PPO\n"
    )
    with pytest.raises(ValueError, match="PPO"):
        script.rewrite_imports("from stable_baselines3.ppo import PPO\n", "plugin")
    # Submodule imports of anything else are not the script's concern.
    text = "from stable_baselines3.common.env_util import make_vec_env\n"
    assert script.rewrite_imports(text, "plugin") == text


def _fake_sources(folder: Path, script) -> Path:
    """A stand-in for SB3's unpacked sources: every listed test file, one expected and one unexpected failure."""
    tests = folder / "tests"
    tests.mkdir(parents=True)
    (folder / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    for name in script.TEST_FILES:
        (tests / f"{name}.py").write_text("from stable_baselines3 import A2C\n")
    (tests / "test_gae.py").write_text(
        "import pytest\n"
        "from stable_baselines3 import A2C\n\n\n"
        '@pytest.mark.parametrize("model_class", [A2C])\n'
        '@pytest.mark.parametrize("handle_timeout_termination", [True])\n'
        "def test_infinite_horizon(model_class, handle_timeout_termination):\n"
        "    assert False\n"
    )
    (tests / "test_run.py").write_text(
        "from stable_baselines3 import A2C\n\n\n"
        "def test_a2c_is_acktr():\n"
        '    assert A2C.__name__ == "ACKTR"\n\n\n'
        "def test_a2c_keeps_its_name():\n"
        '    assert A2C.__name__ == "A2C"\n'
    )
    return folder


def test_only_failures_outside_the_exclusions_are_reported(tmp_path: Path) -> None:
    script = load_script()
    sources = _fake_sources(tmp_path / "sdist", script)
    unexpected = script.run_target(sources, "acktr", tmp_path / "work", [])
    # test_infinite_horizon[True-ACKTR] fails as listed; test_a2c_keeps_its_name is no exclusion.
    assert unexpected == ["test_run.py::test_a2c_keeps_its_name"]
    assert "test_gae.py::test_infinite_horizon[True-ACKTR]" in script.EXCLUSIONS["acktr"]
    written = (tmp_path / "work" / "acktr" / "tests" / "test_run.py").read_text()
    assert written.startswith("from agents import ACKTR as A2C")


def test_the_plugin_target_runs_sb3_algorithms_with_the_kronecker_policies(tmp_path: Path) -> None:
    script = load_script()
    tests = script.prepare(_fake_sources(tmp_path / "sdist", script), "plugin", tmp_path / "work")
    namespace: dict = {}
    exec((tests / "_kron_algorithms.py").read_text(), namespace)
    import agents

    assert namespace["KA2C"].policy_aliases["MlpPolicy"] is agents.KroneckerActorCriticPolicy
    assert namespace["KPPO"].policy_aliases["MultiInputPolicy"] is agents.KroneckerMultiInputActorCriticPolicy
    assert namespace["KPPO"].__mro__[1].__name__ == "PPO"


def test_a_test_file_that_fails_to_import_is_an_unexpected_failure(tmp_path: Path) -> None:
    script = load_script()
    sources = _fake_sources(tmp_path / "sdist", script)
    (sources / "tests" / "test_run.py").write_text("import a_module_that_is_not_there\n")
    unexpected = script.run_target(sources, "acktr", tmp_path / "work", [])
    assert unexpected == ["test_run.py::(collection error)", "pytest exit status 2"]


def test_a_pytest_run_that_does_not_finish_fails_even_where_an_earlier_report_is_left(tmp_path: Path) -> None:
    script = load_script()
    sources = _fake_sources(tmp_path / "sdist", script)
    (sources / "tests" / "test_run.py").write_text("from stable_baselines3 import A2C\n")
    assert script.run_target(sources, "acktr", tmp_path / "work", []) == []  # a report with no failure
    assert script.run_target(sources, "acktr", tmp_path / "work", ["--no-such-option"]) == ["pytest exit status 4"]
