"""Recipes are data: a strict schema (unknown keys are errors), one config class per method.

A recipe is YAML::

    version: 1
    name: prune-qat-int8
    target: x86            # export profile: x86 | arm64 | tensorrt
    stages:
      - method: prune
        target_sparsity: 0.5
        epochs: 2
      - method: qat
        epochs: 3

``--set stages.0.epochs=3`` overrides any field before validation; every problem is listed at
once with its path.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from edgec.errors import RecipeError
from edgec.registry import did_you_mean
from edgec.safeyaml import clip, excerpt, load_file, load_text
from edgec.stages.config import Strict as _Strict
from edgec.stages.registry import method_names, quantizing_methods, stage_union


Stage = stage_union()  # every registered method's config class (edgec/stages/<method>.py)
METHODS = method_names()
QUANT_METHODS = quantizing_methods()  # stages that quantize: at most one per recipe
MAX_PROBLEMS = 50  # listed in one error (the count says how many in all)



OPSETS = (13, 21)  # the ONNX opsets edgec exports (``export.opset``, ``edgec export --opset``)


class ExportCfg(_Strict):
    enabled: bool = Field(True, description="false: compress stops after training, nothing exported or benched")
    opset: int = Field(17, ge=OPSETS[0], le=OPSETS[1])
    parity_samples: int = Field(1000, ge=1)
    min_fidelity: float | None = Field(0.9, ge=0, le=1, description=(
        "least top-1 agreement of the compressed artifact with the FP32 input model on the parity samples; "
        "below it compress fails with exit 6 (FidelityError) unless --allow-low-fidelity; null = report only. "
        "Checked when the input model came with --weights (or in memory) and the recipe quantizes"))


class BenchCfg(_Strict):
    enabled: bool = Field(True, description="false: the artifacts are exported and checked but not measured")
    threads: int = Field(1, ge=1)
    batch: int = Field(1, ge=1, description="the headline batch: the report's p50 and speedup_vs_fp32, accuracy "
                                            "batches, the precision choice of quantizing stages")
    batches: list[Annotated[int, Field(ge=1)]] = Field([1, 32], description=(
        "batches the FP32 and compressed artifacts are also timed at, each in its own interleaved run (the report "
        "shows p50 and speed-up at every one; bench.batch always is one of them); [] = bench.batch only"))
    warmup: int = Field(10, ge=0)
    runs: int = Field(100, ge=1)
    rounds: int = Field(5, ge=1, description="interleaved rounds when the run's artifacts are timed against each "
                                            "other (the report's latency and speed-up: median and spread over rounds)")
    eval_samples: int | None = Field(None, ge=1, description="limit ORT accuracy to this many eval samples")
    pgd_samples: int = Field(200, ge=0, description="adversarially trained / eed runs: PGD robust accuracy of the "
                                                    "exported models on a seeded subset of this many eval samples "
                                                    "(0 = off); eps and norm of the recipe's adversarial training")
    pgd_steps: int = Field(10, ge=1, description="PGD iterations of that evaluation (step eps/4, random start)")
    remote: str | None = Field(None, description="also bench the artifacts on this device over SSH: a name in the "
                                                 "devices file ($EDGEC_DEVICES) or ssh://user@host[:port]")
    max_drop: float | None = Field(0.2, ge=0, le=1, description="accuracy gate (exit 7): the exported compressed "
                                   "model may lose at most this much accuracy (0.2 = 20 points) against the exported "
                                   "input model, and may never fall to chance when the input is above it; null = off")


class Recipe(_Strict):
    version: Literal[1] = 1
    name: str = "unnamed"
    description: str = ""
    target: Literal["x86", "arm64", "tensorrt"] = "x86"
    seed: int = Field(0, ge=0, le=2**31 - 1, description="numpy/torch/sklearn seeds (each stage adds its index)")
    stages: list[Stage] = Field(..., min_length=1)
    export: ExportCfg = Field(default_factory=ExportCfg)
    bench: BenchCfg = Field(default_factory=BenchCfg)

    @field_validator("stages")
    @classmethod
    def _one_quantization(cls, stages: list) -> list:
        quant = [i for i, s in enumerate(stages) if s.method in QUANT_METHODS]
        if len(quant) > 1:
            raise ValueError(f"at most one quantizing stage (qat/ptq/qkd/pqk) per recipe (found at {quant})")
        if quant:
            after = [s.method for s in stages[quant[0] + 1:] if s.method == "prune"]
            if after:
                raise ValueError("prune stages must come before the quantizing (qat/ptq/qkd/pqk) stage")
        want = 8 if quant else 32
        for i, s in enumerate(stages):
            if s.method == "prune" and s.target_bytes is not None and s.deployed_bits != want:
                raise ValueError(
                    f"stage {i}: deployed_bits={s.deployed_bits} but the exported weights are "
                    + (f"int8 (stage {quant[0]} quantizes; lower bit widths are stored in the int8 container)"
                       if quant else "float32 (no quantizing stage follows)")
                    + f"; set stages.{i}.deployed_bits={want}")
            if s.method == "prune_channels" and s.measure_as == "quantized" and not any(q > i for q in quant):
                raise ValueError(f"stage {i}: prune_channels measure_as: quantized needs a quantizing stage (qat, ptq, "
                                 f"qkd, pqk) after it; add one, or set stages.{i}.measure_as=fp32 (or auto)")
        return stages


# ----------------------------------------------------------------------------------------------
# loading

def shipped_dir() -> Path:
    """Folder of the shipped recipes (inside the wheel, or the repo's recipes/ when editable)."""
    try:
        p = Path(str(importlib.resources.files("edgec") / "_recipes"))
        if p.is_dir():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipes() -> dict[str, Path]:
    return {p.stem.replace("_", "-"): p for p in sorted(shipped_dir().glob("*.yaml"))}


def _loc(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif item in METHODS and parts and parts[-1].isdigit():
            continue  # discriminator tag, not a user path
        else:
            parts.append(str(item))
    return ".".join(parts) or "<root>"


def _parse_value(text: str) -> Any:
    try:
        return load_text(text, "--set value")
    except RecipeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> list[str]:
    """Apply ``a.b.0.c=value`` overrides in place; return problems (paths that do not exist)."""
    problems = []
    for ov in overrides:
        if "=" not in ov:
            problems.append(f"--set {ov!r}: expected KEY=VALUE, e.g. stages.0.epochs=3")
            continue
        key, _, raw = ov.partition("=")
        parts = key.strip().split(".")
        node: Any = data
        ok = True
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})  # e.g. kd.temperature on a stage without kd
            else:
                problems.append(f"--set {key}: {'.'.join(parts[:i + 1])} does not exist")
                ok = False
                break
        if not ok:
            continue
        last = parts[-1]
        if isinstance(node, list):
            if last.isdigit() and int(last) < len(node):
                node[int(last)] = _parse_value(raw)
            else:
                problems.append(f"--set {key}: index {last} out of range")
        elif isinstance(node, dict):
            node[last] = _parse_value(raw)
        else:
            problems.append(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping")
    return problems


def resolve_source(name_or_path: str) -> tuple[str, Path]:
    """A shipped recipe name or a YAML path -> (label, path)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in name_or_path:
        if p.is_dir():
            raise RecipeError(f"recipe {name_or_path!r} is a directory, not a YAML file",
                              hint="pass a shipped recipe name (see `edgec recipes list`) or a path to a YAML file")
        if not p.is_file():
            raise RecipeError(f"recipe file {name_or_path!r} does not exist",
                              hint="pass a shipped recipe name (see `edgec recipes list`) or a path to a YAML file")
        return str(p), p
    shipped = shipped_recipes()
    if name_or_path not in shipped:
        raise RecipeError(f"unknown recipe {name_or_path!r}; {did_you_mean(name_or_path, tuple(shipped))}",
                          hint="`edgec recipes list` shows the shipped recipes")
    return name_or_path, shipped[name_or_path]


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe; raises RecipeError listing every problem."""
    label, path = resolve_source(name_or_path)
    return validate_recipe(load_file(path, label), overrides or [], label=label)


def validate_recipe(data: Any, overrides: list[str], *, label: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{label}: the top level must be a mapping with `stages:`, got {type(data).__name__}")
    problems = apply_overrides(data, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "union_tag_invalid":
                got = err.get("input", {}).get("method") if isinstance(err.get("input"), dict) else err.get("input")
                msg = f"unknown method {excerpt(got)}; " + did_you_mean(clip(got, 40), METHODS)
            problems.append(clip(_loc(err["loc"]), 120) + f": {clip(msg, 300)}" + (
                f" (got {excerpt(err['input'])})" if err["type"] not in (
                    "extra_forbidden", "missing", "union_tag_invalid") and not isinstance(err.get("input"), dict)
                else ""))
    else:
        if not problems:
            return recipe
    shown = problems[:MAX_PROBLEMS] + ([f"... and {len(problems) - MAX_PROBLEMS} more"]
                                       if len(problems) > MAX_PROBLEMS else [])
    raise RecipeError(f"{label} has {len(problems)} problem(s):", shown,
                      hint="fix the listed keys; `edgec recipes show NAME` prints a valid example")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
