"""An experiment as validated data: model + a chain of compression steps + measurement options.

Everything here serialises to JSON (`Experiment.model_dump_json()`), so a run in the store can be
re-run, shown, and shared. Out-of-range values raise RecipeError with a message naming the field.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

DEFAULT_MODEL = "smollm2-135m"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _WeightQuantStep(_Strict):
    """Weight-only quantization settings shared by RTN and GPTQ (same packed storage)."""

    bits: int = 4
    group_size: int | None = Field(None, description="columns per scale; None = one scale per output channel")
    symmetric: bool = True
    skip: list[str] = Field(default_factory=lambda: ["lm_head"])

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"group_size must be a positive number of columns (or empty for per-channel), got {v}")
        return v

    def _format(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


class RTNStep(_WeightQuantStep):
    """Round-to-nearest weight-only quantization of every linear layer (except `skip`)."""

    method: Literal["rtn"] = "rtn"

    def label(self) -> str:
        return f"RTN {self._format()}"


class CalibrationOptions(_Strict):
    """Token windows that calibrated methods observe (drawn from the calibration split)."""

    corpus: str = Field("brown", description="'brown' (built-in calibration split) or a path to a UTF-8 text file")
    windows: int = Field(32, ge=1, le=4096)
    window_len: int = Field(256, ge=8, le=8192)
    seed: int = Field(0, ge=0)


class GPTQStep(_WeightQuantStep):
    """GPTQ (Frantar et al. 2022): second-order weight quantization, layer by layer on calibration data."""

    method: Literal["gptq"] = "gptq"
    group_size: int | None = 128
    act_order: bool = Field(True, description="quantize columns by decreasing Hessian diagonal, with static groups")
    damp: float = Field(0.01, gt=0, le=1)
    block_size: int = Field(128, ge=1, le=8192)
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)

    def label(self) -> str:
        return f"GPTQ {self._format()}{' act-order' if self.act_order else ''}"


class AWQStep(_WeightQuantStep):
    """AWQ (Lin et al. 2023): activation-aware per-channel scales (searched over n_grid values of alpha, folded
    into the preceding norm / linear) and per-group range clipping, layer by layer on calibration data, then RTN.
    Symmetric by default like the other methods here; AutoAWQ defaults to asymmetric (zero point), group 128."""

    method: Literal["awq"] = "awq"
    group_size: int | None = 64
    n_grid: int = Field(20, ge=1, le=100)
    clip: bool = True
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)

    def label(self) -> str:
        return f"AWQ {self._format()}{'' if self.clip else ' no-clip'}"


AUTO_SMOOTHING = ("int8",)  # schemes that smoothquant_alpha="auto" smooths


class W8A8Step(_Strict):
    """8-bit weights AND activations (dynamic per-token scales), int8 or FP8 E4M3, per-output-channel weight
    scales; optional SmoothQuant smoothing (alpha in [0, 1], "auto" = searched per group of linears on the
    calibration data, empty = none); weights rounded by GPTQ (calibrated) or to nearest."""

    method: Literal["w8a8"] = "w8a8"
    scheme: Literal["int8", "fp8"] = "int8"
    smoothquant_alpha: Literal["auto"] | Annotated[float, Field(ge=0, le=1)] | None = "auto"
    weight_rounding: Literal["gptq", "rtn"] = "gptq"
    damp: float = Field(0.01, gt=0, le=1)
    skip: list[str] = Field(default_factory=lambda: ["lm_head"])
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)

    def needs_calibration(self) -> bool:
        return self.weight_rounding == "gptq" or self.smoothquant_alpha is not None

    def smooths(self) -> bool:
        """A fixed alpha always smooths; "auto" only for the schemes in AUTO_SMOOTHING (see core/quant/smoothquant.py
        for why FP8 gains nothing from it). FP8 instead searches its per-channel weight scales on calibration data."""
        a = self.smoothquant_alpha
        return a is not None and (a != "auto" or self.scheme in AUTO_SMOOTHING)

    def label(self) -> str:
        a = self.smoothquant_alpha
        smooth = f" SmoothQuant a={a if a == 'auto' else format(a, 'g')}" if self.smooths() else ""
        scales = " searched scales" if self.scheme == "fp8" and self.needs_calibration() else ""
        return f"W8A8 {self.scheme.upper() if self.scheme == 'fp8' else self.scheme}{smooth}{scales}" + \
            (" GPTQ" if self.weight_rounding == "gptq" else "")


class BnbStep(_Strict):
    """bitsandbytes: LLM.int8 (mode int8) or 4-bit NF4/FP4 weights, applied while loading."""

    method: Literal["bnb"] = "bnb"
    mode: Literal["int8", "nf4", "fp4"] = "nf4"
    compute_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    double_quant: bool = False
    int8_threshold: float = 6.0

    @field_validator("int8_threshold")
    @classmethod
    def _thr(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"int8_threshold must be >= 0, got {v}")
        return v

    def label(self) -> str:
        return "bnb LLM.int8" if self.mode == "int8" else f"bnb {self.mode.upper()}{' +DQ' if self.double_quant else ''}"


class PruneStep(_Strict):
    """Unstructured or N:M pruning (weights set to zero in place; stored compressed at the end of the chain):
    magnitude (|W|), Wanda (|W| x input feature norm) or SparseGPT (second order, with weight updates), the
    last two through the shared calibration pass. OWL: non-uniform per-layer ratios from outlier statistics,
    keeping the overall ratio (unstructured only)."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights removed (N:M fixes it to 1 - N/M)")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (N kept of every M, e.g. 2:4, 4:8)")
    owl: bool = False
    damp: float = Field(0.01, gt=0, le=1)
    skip: list[str] = Field(default_factory=lambda: ["lm_head"])
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        from .prune.masks import parse_pattern

        try:
            parse_pattern(v)
        except ValueError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _owl_unstructured(self):
        if self.owl and self.pattern.strip().lower() != "unstructured":
            raise ValueError("OWL (non-uniform layer ratios) applies to unstructured sparsity only, not N:M")
        return self

    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.owl

    def label(self) -> str:
        name = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}[self.method]
        amount = self.pattern if self.pattern != "unstructured" else f"{self.sparsity:.0%}"
        return f"{name} {amount}{' OWL' if self.owl else ''}"


class StructuredStep(_Strict):
    """Structured pruning into a smaller dense model (Llama-family): remove a fraction of MLP channels and of
    attention heads in every layer, and whole decoder layers, by calibration-based importance."""

    method: Literal["structured"] = "structured"
    mlp_sparsity: float = Field(0.0, ge=0, lt=1)
    head_sparsity: float = Field(0.0, ge=0, lt=1)
    head_mode: Literal["query", "kv_group"] = "query"
    remove_layers: int = Field(0, ge=0)
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)

    def label(self) -> str:
        parts = [f"{self.mlp_sparsity:.0%} MLP channels" if self.mlp_sparsity else "",
                 f"{self.head_sparsity:.0%} heads" if self.head_sparsity else "",
                 f"{self.remove_layers} layers" if self.remove_layers else ""]
        return "Structured: -" + ", -".join(p for p in parts if p) if any(parts) else "Structured (nothing removed)"


class DistillStep(_Strict):
    """Knowledge distillation (Hinton et al. 2015): train the student (the model as the steps before left it, or a
    smaller configuration of it) to match the teacher's next-token distributions on the calibration split. Pruned
    weights stay pruned; quantized layers train with fake quantization (straight-through) and are re-packed at the
    end. Held-out perplexity (evaluation-split windows not used by the final measurement) is tracked every
    `eval_every` steps; the best weights are kept. nproc > 1 launches that many processes with torchrun (DDP, or
    FSDP2 with strategy "fsdp"), one GPU each."""

    method: Literal["distill"] = "distill"
    teacher: str = Field("baseline", description="'baseline' (the run's uncompressed model) or another model with the same tokenizer")
    student_layers: int | None = Field(None, ge=1, description="smaller student: keep this many decoder layers (initialised from the teacher's)")
    student_hidden_size: int | None = Field(None, ge=1, description="smaller student: hidden width (random initialisation)")
    student_intermediate_size: int | None = Field(None, ge=1, description="smaller student: MLP width (random initialisation)")
    kl: float = Field(1.0, ge=0, description="weight of forward KL(teacher || student)")
    reverse_kl: float = Field(0.0, ge=0, description="weight of reverse KL(student || teacher)")
    js: float = Field(0.0, ge=0, description="weight of the Jensen-Shannon divergence")
    ce: float = Field(0.0, ge=0, description="weight of next-token cross-entropy on the training text")
    hidden: float = Field(0.0, ge=0, description="weight of hidden-state matching (learned projection when widths differ)")
    temperature: float = Field(1.0, gt=0, le=100)
    max_steps: int = Field(100, ge=1, le=1_000_000)
    time_budget_s: float | None = Field(None, gt=0, description="stop after this much training time (the schedule still spans max_steps)")
    micro_batch: int = Field(4, ge=1, le=4096, description="windows per forward pass (per process)")
    grad_accum: int = Field(1, ge=1, le=1024)
    lr: float = Field(1e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(25, ge=1)
    val_windows: int = Field(8, ge=1, le=4096)
    patience: int = Field(0, ge=0, description="evaluations without improvement before stopping early (0 = never)")
    checkpoint_every: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)
    nproc: int = Field(1, ge=1, le=64, description="processes (one GPU each) launched with torchrun; 1 = in this process")
    strategy: Literal["ddp", "fsdp"] = "ddp"
    launcher: Literal["auto", "torchrun"] = Field("auto", description="auto: in this process when nproc is 1; torchrun: "
                                                  "always launch processes (e.g. to compare 1 and N on one path)")
    data: CalibrationOptions = Field(default_factory=lambda: CalibrationOptions(windows=1024),
                                     description="training windows, drawn from the calibration split")

    @model_validator(mode="after")
    def _losses(self):
        if not any((self.kl, self.reverse_kl, self.js, self.ce, self.hidden)):
            raise ValueError("at least one loss weight (kl, reverse_kl, js, ce, hidden) must be positive")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        return self

    def smaller_student(self) -> bool:
        return any(v is not None for v in (self.student_layers, self.student_hidden_size, self.student_intermediate_size))

    def label(self) -> str:
        losses = [n for n, w in (("KL", self.kl), ("RKL", self.reverse_kl), ("JS", self.js), ("CE", self.ce),
                                 ("hidden", self.hidden)) if w]
        student = []
        if self.student_layers:
            student.append(f"{self.student_layers} layers")
        if self.student_hidden_size:
            student.append(f"hidden {self.student_hidden_size}")
        if self.student_intermediate_size:
            student.append(f"MLP {self.student_intermediate_size}")
        who = f" into a student ({', '.join(student)})" if student else ""
        teacher = "" if self.teacher == "baseline" else f" from {self.teacher}"
        budget = f", ≤{self.time_budget_s:g} s" if self.time_budget_s else ""
        return f"Distil{teacher}{who} ({'+'.join(losses)}, {self.max_steps} steps{budget}{', ' + str(self.nproc) + ' procs' if self.nproc > 1 else ''})"


Step = Annotated[Union[RTNStep, GPTQStep, AWQStep, W8A8Step, PruneStep, StructuredStep, BnbStep, DistillStep],
                 Field(discriminator="method")]
STEP_TYPES = {"rtn": RTNStep, "gptq": GPTQStep, "awq": AWQStep, "w8a8": W8A8Step, "magnitude": PruneStep,
              "wanda": PruneStep, "sparsegpt": PruneStep, "structured": StructuredStep, "bnb": BnbStep,
              "distill": DistillStep}


class MeasureOptions(_Strict):
    """What to measure and how. Accuracy uses the same token windows for every run with equal
    (model, corpus, eval_windows, window_len), so perplexity/KL/top-1 are comparable."""

    corpus: str = Field("brown", description="'brown' (built-in evaluation split) or a path to a UTF-8 text file")
    eval_windows: int = Field(16, ge=1, le=4096)
    window_len: int = Field(256, ge=8, le=8192)
    latency: bool = True
    prompt_len: int = Field(128, ge=1, le=8192)
    decode_tokens: int = Field(16, ge=2, le=1024)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 4, 16])
    warmup: int = Field(1, ge=0, le=100)
    repeats: int = Field(3, ge=1, le=1000)
    samples: bool = True
    sample_tokens: int = Field(40, ge=1, le=512)

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 or b > 1024 for b in v):
            raise ValueError(f"batch_sizes must be a non-empty list of integers between 1 and 1024, got {v}")
        return sorted(set(v))


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
WEIGHT_QUANT_METHODS = ("rtn", "gptq", "awq", "w8a8")


def save_refusal(methods: list[str]) -> str | None:
    """Why a run with these step methods cannot save its model (None: it can)."""
    if "bnb" in methods:
        return "a bitsandbytes model cannot be saved (it quantizes while loading)"
    return None  # pruned runs save their sparse storage too (core/checkpoint.py, format "sparse")


class Experiment(_Strict):
    model: str = DEFAULT_MODEL
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    steps: list[Step] = Field(default_factory=list)
    measure: MeasureOptions = Field(default_factory=MeasureOptions)
    name: str | None = None
    save_model: bool = Field(False, description="save the compressed model (core/checkpoint.py) into the run's artifacts")

    @field_validator("save_model")
    @classmethod
    def _save(cls, v: bool, info) -> bool:
        why = save_refusal([s.method for s in info.data.get("steps") or []])
        if v and why:
            raise ValueError(f"{why}: turn save_model off for this run")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("model must not be empty")
        return v

    @field_validator("steps")
    @classmethod
    def _chain(cls, steps: list) -> list:
        for i, s in enumerate(steps):
            if s.method == "bnb" and i != 0:
                raise ValueError("a bitsandbytes step quantizes while loading, so it must be the first step")
        if sum(s.method == "bnb" for s in steps) > 1:
            raise ValueError("only one bitsandbytes step per experiment")
        for i, s in enumerate(steps):
            if s.method != "distill":
                continue
            if any(p.method == "bnb" for p in steps[:i]):
                raise ValueError("a bitsandbytes model cannot be distilled (it cannot be trained here): use RTN, GPTQ, "
                                 "AWQ or W8A8, which train with fake quantization")
            if i > 0 and s.smaller_student():
                raise ValueError("a smaller student (student_layers, ...) is built from the uncompressed model, so its "
                                 "distillation step must come first")
            if i == 0 and s.teacher == "baseline" and not s.smaller_student():
                raise ValueError("distillation needs a student that differs from its teacher: put it after a "
                                 "compression step, set a smaller student (student_layers, ...), or name another teacher")
        return steps

    def label(self) -> str:
        if self.name:
            return self.name
        if not self.steps:
            return f"baseline {self.dtype}"
        return " + ".join(s.label() for s in self.steps) + ("" if self.dtype == "fp32" else f" ({self.dtype})")


def _format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and x in STEP_TYPES))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "Invalid settings: " + "; ".join(parts)


def parse_experiment(data: dict | str) -> Experiment:
    """Validate a dict or JSON string; raise RecipeError with a readable message."""
    try:
        if isinstance(data, str):
            return Experiment.model_validate_json(data)
        return Experiment.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation_error(e)) from None


def parse_step(spec: str) -> dict:
    """CLI step syntax: 'rtn:bits=4,group_size=64,symmetric=false' -> dict for a step; a dotted key
    sets a nested option ('gptq:bits=3,calibration.windows=64')."""
    method, _, rest = spec.partition(":")
    method = method.strip().lower()
    if method not in STEP_TYPES:
        raise RecipeError(f"Unknown step '{method}'. Known steps: {', '.join(STEP_TYPES)}")
    out: dict = {"method": method}
    for kv in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = kv.partition("=")
        if not eq:
            raise RecipeError(f"Step option '{kv}' must look like key=value")
        try:
            value = json.loads(val)
        except json.JSONDecodeError:
            value = val.strip()
        *parents, leaf = key.strip().split(".")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return out
