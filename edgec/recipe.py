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
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgec.errors import RecipeError
from edgec.registry import did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Optim(_Strict):
    """Training settings shared by every training stage."""

    epochs: int = Field(1, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant", "step", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    max_train_samples: int | None = Field(None, ge=1, description="train on a seeded subset of this size")


class KD(_Strict):
    """Knowledge distillation from a teacher (METHODS.md common notation + section 6)."""

    teacher: str = Field("input", description="'input' (the model given to compress) or a model SPEC")
    teacher_weights: str | None = None
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="loss = (1-alpha)*CE + alpha*tau^2*KL")
    calibrate: bool = Field(False, description="fit a temperature T_c for the teacher on held-out data first")
    calibration_fraction: float = Field(0.1, gt=0, lt=1, description="share of train data held out for T_c")


class Adversarial(_Strict):
    """Adversarial training (PGD-AT, Madry et al.): train on attacks of each batch (edgec.attacks).

    eps and step are in pixel units ([0, 1] scale), whatever the data's normalisation."""

    attack: Literal["pgd", "fgsm"] = "pgd"
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(8 / 255, ge=0, description="radius of the perturbation ball, pixel units")
    step: float | None = Field(None, gt=0, description="PGD step size, pixel units (default: eps/4)")
    steps: int = Field(10, ge=1, description="PGD iterations (fgsm: one step of size eps)")
    random_start: bool = Field(True, description="PGD starts at a random point of the ball")
    ratio: float = Field(1.0, ge=0, le=1, description="loss = (1-ratio)*clean + ratio*adversarial (1 = pure PGD-AT)")


class Quant(_Strict):
    weight_bits: int = Field(8, ge=2, le=8)
    act_bits: int = Field(8, ge=2, le=8)
    first_layer_bits: int | None = Field(None, ge=2, le=8)
    last_layer_bits: int | None = Field(None, ge=2, le=8)
    unsupported: Literal["float", "error"] = Field(
        "float", description="layers QAT cannot quantize: leave them float, or stop with an error")
    calibration_samples: int = Field(512, ge=1)
    lsq_init: Literal["auto", "minmax", "lsq"] = Field(
        "auto", description="LSQ step init: max|x|/Qp (minmax), the paper's 2*mean|x|/sqrt(Qp) (lsq), "
                            "or auto = minmax from 6 bits up")


class TrainStage(Optim):
    method: Literal["train"]
    kd: KD | None = None
    adversarial: Adversarial | None = None


class DistillStage(Optim):
    method: Literal["distill"]
    kd: KD = Field(default_factory=KD)


class PruneStage(Optim):
    """Unstructured pruning to ``target_sparsity`` of the prunable weights, or to a size budget
    ``target_bytes`` (exactly one of the two): bytes of non-zero parameters of the exported model
    at their deployed bit width, as ``edgec bench`` counts them (edgec.budget)."""

    method: Literal["prune"]
    target_sparsity: float | None = Field(None, ge=0, lt=1)
    target_bytes: int | None = Field(
        None, ge=1, description="size budget: bytes of non-zero parameters of the exported model (weights at "
                                "deployed_bits, biases at 32 bits, norms left unfused as exported); the prune "
                                "sparsity is derived from it (edgec.budget)")
    deployed_bits: int = Field(
        8, description="bit width the pruned weights are deployed at: 8 when a quantizing stage follows "
                       "(edgec stores quantized weights in int8), 32 for a float export")
    scope: Literal["global", "layer"] = "global"
    schedule_kind: Literal["cubic", "oneshot"] = Field("cubic", description="cubic = AGP (Zhu & Gupta 2017)")
    ramp_fraction: float = Field(0.75, gt=0, le=1, description="share of the stage's steps over which sparsity ramps")
    update_every: int = Field(16, ge=1, description="recompute masks every k steps")
    prune_first_last: bool = Field(False, description="also prune the first conv and the classifier")
    importance: Literal["magnitude", "taylor", "snip", "fisher", "fisher_w2", "random"] = Field(
        "magnitude", description="importance score (edgec.importance); data-aware ones use importance_batches")
    importance_batches: int = Field(4, ge=1, description="training batches per mask update for data-aware scores")
    kd: KD | None = None

    @model_validator(mode="after")
    def _one_target(self) -> "PruneStage":
        if (self.target_sparsity is None) == (self.target_bytes is None):
            raise ValueError("give exactly one of target_sparsity (share of the prunable weights set to zero) "
                             "and target_bytes (size budget of the exported model in bytes)"
                             + (f"; got both ({self.target_sparsity}, {self.target_bytes})"
                                if self.target_sparsity is not None else ""))
        if self.deployed_bits not in (8, 32):
            raise ValueError(f"deployed_bits must be 8 (quantized export: int8 weights) or 32 (float export), "
                             f"got {self.deployed_bits}")
        return self


class QATStage(Optim, Quant):
    method: Literal["qat"]
    weight_quantizer: Literal["lsq", "minmax"] = "lsq"
    act_quantizer: Literal["lsq", "ema"] = "lsq"
    kd: KD | None = None
    lr: float = Field(0.002, gt=0)
    quantizer_lr: float | None = Field(None, gt=0, description="lr of LSQ step sizes (default: lr)")
    norm_bits: int | None = Field(
        None, ge=2, le=8, description="BatchNorms that cannot be folded into a conv (SubSpectralNorm's): quantize "
                                      "their per-channel scale and shift to this many bits (int8 storage, one scale "
                                      "each); None leaves them float32")


class PTQStage(Quant):
    method: Literal["ptq"]
    observer: Literal["minmax", "percentile", "ema"] = "minmax"
    percentile: float = Field(99.99, gt=50, le=100)
    weight_quantizer: Literal["minmax"] = "minmax"
    weight_range: Literal["minmax", "psg"] = Field(
        "minmax", description="per-channel min-max, or PSG's per-layer EMA range (after a psg stage)")
    norm_bits: int | None = Field(
        None, ge=2, le=8, description="BatchNorms that cannot be folded into a conv (SubSpectralNorm's): quantize "
                                      "their per-channel scale and shift to this many bits (int8 storage, one scale "
                                      "each); None leaves them float32")


class PSGStage(Optim):
    """Position-based scaled gradient (METHODS.md section 3): train a full-precision model so it
    quantizes (or prunes) post-training. Follow it with a ``ptq`` stage (``weight_range: psg``)."""

    method: Literal["psg"]
    bits: int | None = Field(4, ge=2, le=8, description="target weight bit width (None: pruning variant only)")
    lambda_s: float = Field(150.0, gt=0, description="gradient scale (150 for 4 bits in the authors' code)")
    eps_rel: float = Field(1e-8, ge=0, description="epsilon = eps_rel * a (a = layer range)")
    range_momentum: float = Field(0.1, gt=0, le=1, description="EMA momentum of the per-layer range")
    target_sparsity: float | None = Field(None, ge=0, lt=1, description="pruning variant: pull the smallest weights to 0")
    first_last_bits: int = Field(8, ge=2, le=8, description="bits of the first conv and last linear when bits < 4")
    kd: KD | None = None


class QKDStage(Optim, Quant):
    """Quantization-aware KD (METHODS.md section 2): Self-studying -> Co-studying -> Tutoring."""

    method: Literal["qkd"]
    weight_bits: int = Field(4, ge=2, le=8)
    act_bits: int = Field(4, ge=2, le=8)
    first_layer_bits: int | None = Field(8, ge=2, le=8)
    last_layer_bits: int | None = Field(8, ge=2, le=8)
    weight_quantizer: Literal["lsq", "minmax"] = "lsq"
    act_quantizer: Literal["lsq", "ema"] = "lsq"
    epochs: int = Field(3, ge=0, description="total; split over SS/CS/TU in the ratio of `split`")
    split: tuple[int, int, int] = Field((30, 100, 70), description="SS:CS:TU epoch ratio (paper's CIFAR 30/100/70)")
    phase_epochs: tuple[int, int, int] | None = Field(None, description="explicit SS, CS, TU epochs (overrides split)")
    alpha: float = Field(0.5, ge=0, le=1, description="student: (1-a)*CE + a*tau^2*KL(T||S)")
    beta: float = Field(0.5, ge=0, le=1, description="teacher in CS: (1-b)*CE + b*tau^2*KL(S||T)")
    kd: KD = Field(default_factory=lambda: KD(temperature=2.0))
    quantizer_lr: float | None = Field(None, gt=0)
    teacher_lr: float | None = Field(None, gt=0, description="teacher lr in CS (default: lr)")


class PQKStage(Optim, Quant):
    """Pruning + QAT, then KD from the pruned-away weights in the same network (METHODS.md section 1)."""

    method: Literal["pqk"]
    target_sparsity: float = Field(..., ge=0, lt=1, description="final global sparsity s_f of the prunable weights")
    epochs: int = Field(3, ge=0, description="phase 1: iterative global magnitude pruning + QAT (CE)")
    kd_epochs: int = Field(2, ge=0, description="phase 2: two-path KD with the mask frozen")
    ramp_fraction: float = Field(0.75, gt=0, le=1, description="share of phase-1 steps over which sparsity ramps (t_f)")
    update_every: int = Field(16, ge=1, description="recompute the global threshold every k steps (DCIL: 16)")
    prune_first_last: bool = Field(False, description="also prune the first conv and the classifier")
    temperature: float = Field(2.0, gt=0, description="tau of both KL terms")
    teacher_updates_kept: bool = Field(
        False, description="teacher loss also updates the kept weights (default: pruned-away weights only)")
    teacher_quantized: bool = Field(
        False, description="teacher path uses the quantized kept weights (default: all weights full precision)")
    weight_quantizer: Literal["lsq", "minmax"] = "lsq"
    act_quantizer: Literal["lsq", "ema"] = "lsq"
    lr: float = Field(0.005, gt=0)
    kd_lr: float | None = Field(None, gt=0, description="phase-2 lr (default: lr)")


class EEDStage(Optim):
    """Efficient Ensemble Defense (METHODS.md section 5): K sub-models of the input model pruned by K
    importance scores, adversarially fine-tuned together for robustness and diversity; at inference
    they run in order and stop early (threshold calibrated on held-out data)."""

    method: Literal["eed"]
    scores: list[Literal["magnitude", "taylor", "snip", "fisher", "fisher_w2", "random"]] = Field(
        ["magnitude", "snip", "fisher_w2"], min_length=2, description="one importance score per sub-model (K = len)")
    target_sparsity: float = Field(0.5, ge=0, lt=1, description="unstructured sparsity of each sub-model")
    scope: Literal["global", "layer"] = "global"
    prune_first_last: bool = Field(False, description="also prune the first conv and the classifier")
    importance_batches: int = Field(4, ge=1, description="training batches for the data-aware scores")
    adversarial: Adversarial = Field(default_factory=lambda: Adversarial(step=2 / 255),
                                     description="attack against the ensemble for training (PGD-AT default)")
    diversity: float = Field(0.5, ge=0, description="weight of the pairwise similarity of the members' "
                                                     "non-true-class predictions on adversarial examples")
    misclassified_weight: float = Field(1.0, ge=0, description="extra CE weight of samples the ensemble gets wrong")
    l1: float = Field(1e-5, ge=0, description="weight of the L1 norm of the kept weights")
    member_subset: float | None = Field(
        None, gt=0, lt=1, description="each sub-model's cross-entropy sees only its own fixed, seeded share of the "
                                      "training samples (METHODS.md 5, step 3); None: every member sees all")
    calibration_fraction: float = Field(0.1, gt=0, lt=1, description="share of train data held out to set the threshold")
    target_accuracy: float | None = Field(None, gt=0, le=1, description="held-out accuracy the dynamic ensemble must "
                                                                        "reach (default: full ensemble - tolerance)")
    accuracy_tolerance: float = Field(0.0, ge=0, lt=1)
    agree: int | None = Field(None, ge=2, description="also stop when the first `agree` sub-models agree")


Stage = Annotated[Union[TrainStage, DistillStage, PruneStage, QATStage, PTQStage, PSGStage, QKDStage, PQKStage,
                        EEDStage],
                  Field(discriminator="method")]


METHODS = ("train", "distill", "prune", "qat", "ptq", "psg", "qkd", "pqk", "eed")
QUANT_METHODS = ("qat", "ptq", "qkd", "pqk")  # stages that quantize: at most one per recipe


class ExportCfg(_Strict):
    enabled: bool = True
    opset: int = Field(17, ge=13, le=21)
    parity_samples: int = Field(1000, ge=1)
    min_fidelity: float | None = Field(0.9, ge=0, le=1, description=(
        "least top-1 agreement of the compressed artifact with the FP32 input model on the parity samples; "
        "below it compress fails with exit 6 (FidelityError) unless --allow-low-fidelity; null = report only. "
        "Checked when the input model came with --weights"))


class BenchCfg(_Strict):
    enabled: bool = True
    threads: int = Field(1, ge=1)
    batch: int = Field(1, ge=1)
    warmup: int = Field(10, ge=0)
    runs: int = Field(100, ge=1)
    eval_samples: int | None = Field(None, ge=1, description="limit ORT accuracy to this many eval samples")
    pgd_samples: int = Field(200, ge=0, description="adversarially trained / eed runs: PGD robust accuracy of the "
                                                    "exported models on a seeded subset of this many eval samples "
                                                    "(0 = off); eps and norm of the recipe's adversarial training")
    pgd_steps: int = Field(10, ge=1, description="PGD iterations of that evaluation (step eps/4, random start)")


class Recipe(_Strict):
    version: Literal[1] = 1
    name: str = "unnamed"
    description: str = ""
    target: Literal["x86", "arm64", "tensorrt"] = "x86"
    seed: int = 0
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
        return yaml.safe_load(text)
    except yaml.YAMLError:
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
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {label}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise RecipeError(f"recipe {label} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    return validate_recipe(data, overrides or [], label=label)


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
                msg = f"unknown method {got!r}; " + did_you_mean(str(got), METHODS)
            problems.append(f"{_loc(err['loc'])}: {msg}" + (f" (got {err['input']!r})" if err["type"] not in (
                "extra_forbidden", "missing", "union_tag_invalid") and not isinstance(err.get("input"), dict) else ""))
    else:
        if not problems:
            return recipe
    raise RecipeError(f"{label} has {len(problems)} problem(s):", problems,
                      hint="fix the listed keys; `edgec recipes show NAME` prints a valid example")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
