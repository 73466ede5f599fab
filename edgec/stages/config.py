"""Config pieces shared by the stage methods' recipe schemas (pydantic only: no torch here).

Each method's own config class lives beside its handler in ``edgec/stages/<method>.py``; these are
the blocks several of them reuse (training settings, KD, adversarial training, quantization).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` / `.nan` are refused here, not by the optimizer after the run started
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Optim(Strict):
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

    @model_validator(mode="after")
    def _warmup_within_epochs(self):
        # the engine's TrainConfig refuses this too, but only once the run directory is written
        if self.warmup_epochs > 0 and self.epochs > 0 and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        return self


class KD(Strict):
    """Knowledge distillation from a teacher (docs/methods.md: notation, teacher calibration)."""

    teacher: str = Field("input", description="'input' (the model given to compress) or a model SPEC")
    teacher_weights: str | None = None
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="loss = (1-alpha)*CE + alpha*tau^2*KL")
    calibrate: bool = Field(False, description="fit a temperature T_c for the teacher on held-out data first")
    calibration_fraction: float = Field(0.1, gt=0, lt=1, description="share of train data held out for T_c")


class Adversarial(Strict):
    """Adversarial training (PGD-AT, Madry et al.): train on attacks of each batch (edgec.attacks).

    eps and step are in pixel units ([0, 1] scale), whatever the data's normalisation."""

    attack: Literal["pgd", "fgsm"] = "pgd"
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(8 / 255, ge=0, description="radius of the perturbation ball, pixel units")
    step: float | None = Field(None, gt=0, description="PGD step size, pixel units (default: eps/4)")
    steps: int = Field(10, ge=1, description="PGD iterations (fgsm: one step of size eps)")
    random_start: bool = Field(True, description="PGD starts at a random point of the ball")
    ratio: float = Field(1.0, ge=0, le=1, description="loss = (1-ratio)*clean + ratio*adversarial (1 = pure PGD-AT)")


class LayerBits(Strict):
    """One layer's (or glob's) bits in a quantizing stage's ``layers:`` block; unset fields keep the stage's."""

    weight_bits: int | None = Field(None, ge=2, le=8)
    act_bits: int | None = Field(None, ge=2, le=8, description="its input and output quantization points")

    @model_validator(mode="after")
    def _some_bits(self):
        if self.weight_bits is None and self.act_bits is None:
            raise ValueError("give weight_bits and/or act_bits (or write `float` to keep the layer in float)")
        return self


class Precision(Strict):
    """Precision chosen by measurement (edgec.mixed_precision): slow integer kernels kept float, an
    accuracy tolerance met by promoting the most sensitive layers."""

    keep_slow_float: bool = Field(
        True, description="profile the uniform artifact against FP32 on the target and keep float every layer "
                          "whose integer kernel is measured slower (kept only if the whole artifact gets faster); "
                          "then float more layers while the artifact is slower than FP32. false = uniform")
    max_drop: float | None = Field(
        None, ge=0, lt=1, description="top-1 tolerance vs the FP32 model (share, 0.005 = 0.5 pt) on training samples "
                                      "outside the calibration set: layers are promoted (8 bit in a stage below 8, "
                                      "else float) until it holds")
    slower_share: float = Field(0.8, gt=0.5, le=1, description="a layer counts as slower when its int8 kernels took "
                                                               "longer in at least this share of the profiled calls")
    min_us: float = Field(2.0, ge=0, description="... and by at least this many microseconds (median)")
    min_gain: float = Field(0.03, ge=0, lt=1, description="the slower layers go float only when the whole artifact "
                                                         "is then measured at least this share faster than uniform "
                                                         "(a smaller gain is inside a shared CPU's noise)")
    eval_samples: int = Field(1000, ge=10, description="samples for the max_drop measurement")
    probe: float = Field(0.25, ge=0, le=1, description="stages that train (qat, qkd): max_drop is judged on candidate "
                                                       "graphs trained for this share of the stage's training samples "
                                                       "(epochs x samples; a binary search over the layers' sensitivity "
                                                       "order, about log2(layers)+2 probes); 0 = judge the calibrated, "
                                                       "untrained graph")
    profile_runs: int = Field(50, ge=5, description="profiled / timed calls per artifact")


class Quant(Strict):
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
    layers: dict[str, Literal["float"] | LayerBits] = Field(
        default_factory=dict,
        description="per-layer precision by module-name glob (fnmatch, e.g. 'layer3.*'): `float` or "
                    "{weight_bits, act_bits}; the first matching glob wins, and it wins over first/last_layer_bits")
    precision: Precision = Field(default_factory=Precision,
                                 description="precision chosen by measurement on the target (edgec.mixed_precision)")

    @model_validator(mode="after")
    def _globs_not_empty(self):
        if any(not str(k).strip() for k in self.layers):
            raise ValueError("layers: an empty glob matches no layer; write a module name or glob such as 'layer3.*'")
        return self
