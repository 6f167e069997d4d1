import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
