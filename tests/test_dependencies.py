"""Dependency drift (issue 12): bounded ranges, a lock of what CI passed with, installs that use it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
packaging = pytest.importorskip("packaging.requirements")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402


def _direct() -> list[Requirement]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in meta["dependencies"] + meta["optional-dependencies"]["test"]]


def _locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_direct_dependency_has_an_upper_bound():
    unbounded = [str(r) for r in _direct() if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
    assert not unbounded, f"no upper bound (a new major/minor can break edgec, as typer 0.29 did): {unbounded}"


def test_the_lock_pins_every_direct_dependency_within_its_range():
    pins = _locked()
    for req in _direct():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
    assert "edgec" not in pins, "the project itself is not a constraint"


def test_installs_use_the_lock_and_drift_does_not():
    make = (REPO / "Makefile").read_text()
    targets = dict(re.findall(r"^([\w$()./-]+):[^\n]*\n((?:\t[^\n]*\n?)*)", make, re.M))
    install = targets["$(VENV)/.installed"]
    for line in install.splitlines():
        if "pip install" in line and "--upgrade pip" not in line and "--no-deps" not in line:
            assert "-c $(CONSTRAINTS)" in line, line
    assert "$(CONSTRAINTS)" in re.search(r"^\$\(VENV\)/\.installed:(.*)$", make, re.M).group(1)
    assert "-c " not in targets["drift"] and "pytest" in targets["drift"]
    assert "make test" in (REPO / ".ci" / "run").read_text()
