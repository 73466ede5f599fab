"""Test tiers (markers registered in pyproject.toml):

* ``integration``: a CLI/pipeline run end to end (``edgec compress`` through ``run_cli`` or a
  subprocess), several processes (torchrun, kill-and-resume), or real data from EDGEC_DATA. Marked
  explicitly in the test files; a test that takes the ``edgec_data`` fixture is marked here too.
* ``unit``: every other test (marked here): fast, no real data.
* ``slow``: benchmark-sized (over ~60 s on a 2-core machine). Deselected by default through
  ``-m 'not slow'`` in addopts: ``pytest -m slow`` runs only them, ``pytest -m ""`` or
  ``pytest --run-slow`` everything.

``gpu`` / ``trt`` / ``remote`` tests are skipped with the reason when the hardware or library is absent."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("EDGEC_NO_PROGRESS", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (drops the default -m 'not slow')")


def pytest_configure(config):
    if config.getoption("--run-slow") and config.option.markexpr == "not slow":
        config.option.markexpr = ""


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "edgec_data" in getattr(item, "fixturenames", ()) and "integration" not in item.keywords:
            item.add_marker(pytest.mark.integration)
        if "integration" not in item.keywords:
            item.add_marker(pytest.mark.unit)
    reasons = {}
    if not _cuda():
        reasons["gpu"] = "no CUDA GPU on this machine"
    if importlib.util.find_spec("tensorrt") is None:
        reasons["trt"] = "TensorRT is not installed (it comes only from NVIDIA's index)"
    for item in items:
        for marker, why in reasons.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine run far faster on one intra-op thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def edgec_data() -> Path:
    root = os.environ.get("EDGEC_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("real datasets not available: set EDGEC_DATA (CI sets ../shared/data)")
    return Path(root)


@pytest.fixture
def private_cache(tmp_path_factory, monkeypatch):
    """A test's own decode/feature cache: nothing is written under ~/.cache (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("private_cache")``)."""
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path_factory.mktemp("edgec-cache")))
