"""Property-based hostile input (issue 12): random bytes, random YAML and mutations of every shipped
recipe through `edgec recipes validate` and the compress parser; random .npy arrays through the device
runner. Every example must end in exit 0 or 2 with one message and no traceback (exit 1 = a crash).

A few hundred examples per property in the default run; ``slow`` runs many more (``--run-slow``).
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from cli_util import run_cli  # noqa: E402

FAST, SLOW = 200, 3000


def _settings(n: int):
    return settings(max_examples=n, deadline=None, database=None, derandomize=n == FAST,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def _cli(*args) -> tuple[int, str, str]:
    """The real entry point in-process; (exit code, stdout, stderr)."""
    import sys

    from edgec.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["edgec", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def _assert_handled(code: int, err: str) -> None:
    assert code in (0, 2), f"exit {code}: {err[:2000]}"
    assert "Traceback" not in err and "unexpected" not in err, err[:2000]
    assert len(err) < 20_000, f"a {len(err)}-character message"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _validate_and_parse(work: Path, raw: bytes, overrides: tuple[str, ...] = ()) -> int:
    """`recipes validate` and `compress` (whose recipe is validated first; the data SPEC then stops it)
    on the same bytes; they must agree, and compress writes nothing."""
    path = work / "r.yaml"
    path.write_bytes(raw)
    sets = [a for o in overrides for a in ("--set", o)]
    code, _, err = _cli("recipes", "validate", path, *sets)
    _assert_handled(code, err)
    out = work / "never"
    c2, _, err2 = _cli("compress", "--model", "digits_cnn", "--data", "nosuchkind", "--recipe", path,
                       "--out", out, *sets)
    _assert_handled(c2, err2)
    assert c2 == 2 and not out.exists()
    if code == 0:
        assert "unknown data kind" in err2 or "nosuchkind" in err2, err2  # the recipe passed in compress too
        _assert_runs(path, overrides)
    else:
        assert "nosuchkind" not in err2, "validate refused what compress accepted"
    return code


def _assert_runs(path: Path, overrides) -> None:
    """What validates, runs: every training stage's settings make an engine TrainConfig."""
    from edgec.engine import TrainConfig
    from edgec.recipe import load_recipe

    recipe = load_recipe(str(path), list(overrides))
    for i, s in enumerate(recipe.stages):
        if getattr(s, "epochs", 0) and hasattr(s, "lr"):
            TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, optimizer=s.optimizer,
                        momentum=s.momentum, weight_decay=s.weight_decay, schedule=s.schedule,
                        warmup_epochs=s.warmup_epochs, grad_clip=s.grad_clip, seed=recipe.seed + i)


# ---------------------------------------------------------------------------------------------
# strategies

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["qat", "prune", "ptq", "train", "distill", "eed", "pqk", "psg", "qkd", "x86", "sgd",
                     "adam", "input", "minmax", "-1", "1e400", ".inf", "", "0", "stages"]),
)
_keys = st.one_of(st.sampled_from(["method", "stages", "epochs", "lr", "seed", "target", "export", "bench",
                                   "opset", "kd", "version", "name", "batch_size", "warmup_epochs",
                                   "target_sparsity", "weight_bits", "max_drop", "teacher"]),
                  st.text(max_size=12))
_yaml_values = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                             st.dictionaries(_keys, kids, max_size=5)),
                            max_leaves=30)


def _shipped() -> dict[str, dict]:
    from edgec.recipe import shipped_recipes

    return {name: yaml.safe_load(p.read_text()) for name, p in shipped_recipes().items()}


SHIPPED = _shipped()


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def _mutated_recipe(draw):
    import copy

    doc = copy.deepcopy(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))])
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        kind = draw(st.sampled_from(["replace", "delete", "add", "scalar"]))
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "add" and isinstance(parent, dict):
            parent[draw(_keys)] = draw(_yaml_values)
        elif kind == "scalar":
            parent[path[-1]] = draw(_scalars)
        else:
            parent[path[-1]] = draw(_yaml_values)
    return doc


def _dump(doc) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True).encode()


_overrides = st.lists(
    st.builds(lambda k, v: f"{k}={v}",
              st.sampled_from(["seed", "stages.0.lr", "stages.0.epochs", "stages.0.batch_size", "export.opset",
                               "stages.0.warmup_epochs", "bench.max_drop", "target", "stages.9.epochs",
                               "stages.0.kd.temperature", "stages.0", "stages", "nosuch.key"]),
              st.one_of(st.sampled_from(["-1", ".inf", ".nan", "1e400", "0", "3", "99", str(2**64), "[1, 2]",
                                         "{a: 1}", "null", "&a [*a]", "'x'", "!!binary AAAA", ": :"]),
                        st.text(max_size=20))),
    max_size=3)


# ---------------------------------------------------------------------------------------------
# properties


def _random_bytes(work, raw):
    _validate_and_parse(work, raw)


def _random_yaml(work, doc):
    _validate_and_parse(work, _dump(doc))


def _mutations(work, doc, overrides):
    _validate_and_parse(work, _dump(doc), tuple(overrides))


@_settings(FAST)
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode)))
def test_random_bytes(work, raw):
    _random_bytes(work, raw)


@_settings(FAST)
@given(doc=_yaml_values)
def test_random_yaml(work, doc):
    _random_yaml(work, doc)


@_settings(FAST)
@given(doc=_mutated_recipe(), overrides=_overrides)
@example(doc=SHIPPED["demo"], overrides=["stages.0.lr=.inf"])  # validated on main, failed once the run had started
@example(doc=SHIPPED["demo"], overrides=["stages.0.warmup_epochs=9"])
@example(doc=SHIPPED["demo"], overrides=["seed=-1"])
def test_mutated_shipped_recipes(work, doc, overrides):
    _mutations(work, doc, overrides)


def test_every_shipped_recipe_validates_and_parses(work):
    for name, doc in SHIPPED.items():
        assert _validate_and_parse(work, _dump(doc)) == 0, name


@pytest.mark.slow
@_settings(SLOW)
@given(raw=st.one_of(st.binary(max_size=2000), st.text(max_size=1000).map(str.encode)), doc=_yaml_values)
def test_random_bytes_and_yaml_slow(work, raw, doc):
    _random_bytes(work, raw)
    _random_yaml(work, doc)


@pytest.mark.slow
@_settings(SLOW)
@given(doc=_mutated_recipe(), overrides=_overrides)
def test_mutated_shipped_recipes_slow(work, doc, overrides):
    _mutations(work, doc, overrides)


# ---------------------------------------------------------------------------------------------
# the device runner on random .npy arrays


@pytest.fixture(scope="module")
def onnx_model(work) -> Path:
    from test_hostile import _onnx_conv

    return _onnx_conv(work / "m.onnx", 1, 1)


_dtypes = st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes(),
                    hnp.array_dtypes(max_size=3), hnp.datetime64_dtypes(), hnp.timedelta64_dtypes())
_shapes = st.one_of(hnp.array_shapes(min_dims=0, max_dims=5, max_side=9),
                    st.sampled_from([(1, 8, 8), (2, 1, 8, 8), (0, 1, 8, 8), (3, 1, 8, 1)]))


def _runtime_on(work: Path, model: Path, arr: np.ndarray, bench: bool) -> None:
    from edgec import runtime

    path = work / "x.npy"
    np.save(path, arr, allow_pickle=False)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = runtime.main([str(model), "--input", str(path)] + (["--bench", "--runs", "1", "--warmup", "0"]
                                                                    if bench else []))
    text = err.getvalue()
    assert code in (0, 2), f"exit {code}: {text[:2000]}"
    assert "Traceback" not in text and "unexpected" not in text, text[:2000]
    if code == 0 and not bench:
        assert arr.dtype.kind in "biuf" and math.prod(arr.shape) > 0


def _random_npy(work, model, arr, bench):
    _runtime_on(work, model, arr, bench)


@_settings(FAST)
@given(arr=hnp.arrays(_dtypes, _shapes), bench=st.booleans())
def test_runtime_random_npy(work, onnx_model, arr, bench):
    _random_npy(work, onnx_model, arr, bench)


@pytest.mark.slow
@_settings(SLOW)
@given(arr=hnp.arrays(_dtypes, _shapes), bench=st.booleans())
def test_runtime_random_npy_slow(work, onnx_model, arr, bench):
    _random_npy(work, onnx_model, arr, bench)
