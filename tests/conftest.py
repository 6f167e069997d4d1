import os
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

# Hypothesis profiles: "ci" (the default) keeps every property test to a few seconds; "long"
# (HYPOTHESIS_PROFILE=long, what `make fuzz` sets) runs the fuzz suite for minutes. Tests that
# pin max_examples themselves keep it; deadlines are off (a shared CPU makes them flaky) and
# the fuzz tests bound each example's time themselves.
settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("long", max_examples=10_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_SESSION_TMP: list[str] = []


def pytest_configure(config):
    """Temp folders (push staging, a dry run's kept folder, anything a child process makes) go
    to one folder for the run, in this process and in those it starts, removed at the end: a
    suite run leaves nothing in /tmp. Set once per run, not per test: changing the environment
    between tests moves glibc's heap under test_trainer_speed's allocator test."""
    if os.environ.get("PYTEST_XDIST_WORKER") or _SESSION_TMP:
        return
    tmp = tempfile.mkdtemp(prefix="adapterhub-tests-")
    _SESSION_TMP.append(tmp)
    os.environ["TMPDIR"] = tmp
    tempfile.tempdir = tmp


def pytest_unconfigure(config):
    import shutil

    for tmp in _SESSION_TMP:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own registry home and cache; nothing touches ~."""
    monkeypatch.setenv("ADAPTERS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ADAPTERS_PROGRESS", "0")
    monkeypatch.delenv("ADAPTERS_DEBUG", raising=False)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    from tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    from tiny import make_gpt2

    return make_gpt2(tmp_path_factory.mktemp("gpt2") / "base")
