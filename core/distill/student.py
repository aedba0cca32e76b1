"""The student of a distillation: a compressed model made trainable, then compressed again; or a smaller model.

prepare_student() swaps, in place:
- QuantLinear (RTN, GPTQ, AWQ) -> FakeQuantLinear, W8A8Linear / FP8Linear -> FakeW8A8Linear: a trainable float
  weight that every forward rounds onto the layer's FIXED grid (its scales and zero points never change), with
  a straight-through estimator (the rounding's gradient is taken as identity). finalize() rounds the trained
  weight onto that grid once more and packs it into the original class, which then computes what the fake module
  computed.
- SparseLinear -> a dense nn.Linear. Every linear that was pruned (a SparseLinear, or at least PRUNED_FRACTION of
  exact zeros, the threshold GPTQ uses; for fake-quant modules, of its dequantized weight) gets a bool mask of
  its non-zeros: a gradient hook zeroes the gradient of the pruned weights and after_step() puts them back to
  zero, so pruned weights stay pruned.
bitsandbytes layers hold frozen int8 / 4-bit weights that cannot be trained, and are refused.

smaller_student() builds a shallower and/or narrower configuration of the teacher's architecture: fewer layers
start from copies of the teacher's (DistilBERT-style), other widths from random weights.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import find_decoder_layers, is_linear
from ..errors import UnsupportedError
from ..prune.sparse import SparseLinear
from ..quant.gptq import PRUNED_FRACTION
from ..quant.linear import QuantLinear, _set_module
from ..quant.packing import pack_bits
from ..quant.rtn import QuantizedWeight, dequantize, quantize_codes
from ..quant.w8a8 import W8A8Linear, fake_quantize_activations, quantize_with_scale
from .losses import layer_map

BNB_CLASSES = ("Linear8bitLt", "Linear4bit")
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer


def straight_through(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """x_hat in the forward, identity gradient to x. Same gradient as x + (x_hat - x).detach(), but the value is
    exactly x_hat (x - x.detach() is exactly 0, whereas x + (x_hat - x) can be one rounding step off x_hat)."""
    return x_hat.detach() + (x - x.detach())


class _FakeQuant(nn.Module):
    """A trainable float32 weight on a fixed quantization grid (buffers named in GRID), optional bias, optional
    bool `mask` (False: a pruned weight, held at zero)."""

    GRID: tuple[str, ...] = ()

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("mask", None, persistent=False)

    def grid_weight(self) -> torch.Tensor:
        """The current weight (detached) with the mask applied: what gets rounded onto the grid."""
        w = self.weight.detach()
        return w if self.mask is None else w * self.mask

    def quantized_weight(self) -> torch.Tensor:
        """float32 [out, in]: the weight rounded onto the grid, as the packed module dequantizes it."""
        raise NotImplementedError

    def pack(self) -> nn.Module:
        """The packed module (original class) holding the current weight rounded onto the grid."""
        raise NotImplementedError

    def _weight_to_pack(self) -> torch.Tensor:
        w = self.grid_weight()
        if not torch.isfinite(w).all():
            raise ValueError("the trained weight has NaN or infinite values (training diverged): it cannot be "
                             "quantized; lower the learning rate")
        return w

    def _apply(self, fn, recurse=True):
        # model.half() / .to(bf16) must not round the fixed grid: keep its buffers, follow device moves only
        grid = {name: getattr(self, name) for name in self.GRID}
        super()._apply(fn, recurse)
        for name, t in grid.items():
            if t is not None:
                setattr(self, name, t.to(getattr(self, name).device))
        return self


class FakeQuantLinear(_FakeQuant):
    """Trainable stand-in for a QuantLinear: forward(x) == QuantLinear.reference_forward(x) of to_quant_linear()."""

    GRID = ("scales", "zeros")

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group_size: int, bias: torch.Tensor | None = None):
        super().__init__(weight, bias)
        self.bits, self.group_size = bits, group_size  # effective group size: the last group may be shorter
        self.register_buffer("scales", scales.detach().float().clone())  # exact copy of the float16 scales
        self.register_buffer("zeros", None if zeros is None else zeros.detach().clone())  # uint8; None: symmetric

    @classmethod
    def from_quant_linear(cls, ql: QuantLinear) -> FakeQuantLinear:
        return cls(ql.qweight.dequantize(torch.float32), ql.scales, ql.zeros, ql.bits, ql.group_size, ql.bias)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def _codes(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_codes(w, self.scales, self.zeros, self.bits, self.group_size)

    def quantized_weight(self) -> torch.Tensor:
        # core.quant.rtn's own arithmetic, so the packed layer dequantizes to exactly this
        return dequantize(self._codes(self.grid_weight()), self.scales, self.zeros, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = straight_through(self.weight, self.quantized_weight())
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_quant_linear(self) -> QuantLinear:
        codes = self._codes(self._weight_to_pack())
        qw = QuantizedWeight(pack_bits(codes, self.bits), (self.out_features, self.in_features), self.bits,
                             self.group_size, self.symmetric, self.scales.half(),
                             None if self.zeros is None else self.zeros.clone())
        return QuantLinear.from_linear(self, qw)  # from_linear reads only the shape and the bias of its linear

    pack = to_quant_linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {'sym' if self.symmetric else 'asym'}, fake-quant, "
                f"bias={self.bias is not None}, masked={self.mask is not None}")


class FakeW8A8Linear(_FakeQuant):
    """Trainable stand-in for a W8A8Linear / FP8Linear: weight fake-quantized on the fixed per-channel scales,
    input fake-quantized per token (dynamic, as the real layer does), both with a straight-through estimator.
    to_w8a8() packs it into the original class; its forward matches this one up to float rounding."""

    GRID = ("weight_scale",)

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, target: type[W8A8Linear] = W8A8Linear,
                 bias: torch.Tensor | None = None):
        super().__init__(weight, bias)
        self.target, self.scheme = target, target.scheme
        self.register_buffer("weight_scale", weight_scale.detach().float().clone())

    @classmethod
    def from_w8a8(cls, m: W8A8Linear) -> FakeW8A8Linear:
        return cls(m.dequantize_weight(), m.weight_scale, type(m), m.bias)

    def quantized_weight(self) -> torch.Tensor:
        codes = quantize_with_scale(self.grid_weight(), self.weight_scale, self.scheme)
        return codes.float() * self.weight_scale[:, None]  # = W8A8Linear.dequantize_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        xq = straight_through(x2, fake_quantize_activations(x2.detach(), self.scheme))
        w = straight_through(self.weight, self.quantized_weight())
        y = F.linear(xq, w, None if self.bias is None else self.bias.float())
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def to_w8a8(self) -> W8A8Linear:
        # from_linear reads only the shape and the bias of its linear; the weight is rounded onto the given scale
        return self.target.from_linear(self, self._weight_to_pack(), self.weight_scale.clone())

    pack = to_w8a8

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme} W8A8 fake-quant, "
                f"bias={self.bias is not None}, masked={self.mask is not None}")


def _dense_linear(sl: SparseLinear) -> nn.Linear:
    lin = nn.Linear(sl.in_features, sl.out_features, bias=sl.bias is not None, device="meta")
    lin.weight = nn.Parameter(sl.dense_weight())  # reference decoding; a fresh tensor (no shared scratch)
    if sl.bias is not None:
        lin.bias = nn.Parameter(sl.bias.detach().clone())
    return lin


def _is_bnb(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__ in BNB_CLASSES or cls.__module__.split(".")[0] == "bitsandbytes"


def _pruned(weight: torch.Tensor) -> bool:
    return float((weight.detach() == 0).float().mean()) >= PRUNED_FRACTION


def _mask_grad(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    return grad * module.mask  # the module's buffer: it follows model.to(device)


@dataclass
class PreparedStudent:
    """A model prepared for training by prepare_student. masks: module name -> bool mask (False = held at zero;
    the live copy is the module's `mask` buffer, which follows model.to()); fake_quant: fake-quant module names."""

    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    fake_quant: list[str] = field(default_factory=list)
    hooks: list = field(default_factory=list, repr=False)
    finalized: bool = field(default=False, repr=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def after_step(self) -> None:
        """Zero the masked weights again; call it after every optimizer step. The gradient hooks alone keep a
        fresh AdamW from moving them (zero gradient, zero moments, and decay of 0 is 0), but optimizer state
        from before the masks existed, or a wrapper that replaces the parameters (and so drops the hooks), can."""
        for name in self.masks:
            m = self.model.get_submodule(name)
            self.masks[name] = m.mask
            m.weight.mul_(m.mask)

    def finalize(self) -> nn.Module:
        """Pack every fake-quant module into its original class, apply the masks, drop hooks and mask buffers;
        returns the model in eval mode with no parameter requiring gradients."""
        if self.finalized:
            return self.model
        self.after_step()
        for h in self.hooks:
            h.remove()
        self.hooks, self.finalized = [], True
        for name in self.fake_quant:
            _set_module(self.model, name, self.model.get_submodule(name).pack())
        for name in self.masks:
            if name not in self.fake_quant:
                delattr(self.model.get_submodule(name), "mask")
        self.model.eval()
        self.model.requires_grad_(False)
        return self.model

    def info(self) -> dict:
        held = sum(int((~m).sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return {
            "masked_linears": len(self.masks),
            "fake_quant_linears": len(self.fake_quant),
            "trainable_params": sum(p.numel() for p in self.trainable_parameters()),
            "params": sum(p.numel() for p in self.model.parameters()),
            "masked_fraction": held / total if total else 0.0,
        }


def prepare_student(model: nn.Module, keep_masks: bool = True) -> PreparedStudent:
    """Make a (compressed) model trainable, in place: see the module docstring. keep_masks=False lets pruned
    weights grow back (no masks). Float parameters require gradients; the model is in train mode."""
    bnb = [(n, type(m).__name__) for n, m in model.named_modules() if _is_bnb(m)]
    if bnb:
        name, cls = bnb[0]
        raise UnsupportedError(f"a bitsandbytes student cannot be trained: its {cls} layers ({name}, ...) hold "
                               "frozen int8 / 4-bit weights; use RTN/GPTQ/AWQ/W8A8, which train with fake quantization")
    fake, sparse = [], set()
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            new = FakeQuantLinear.from_quant_linear(m)
            fake.append(name)
        elif isinstance(m, W8A8Linear):
            new = FakeW8A8Linear.from_w8a8(m)
            fake.append(name)
        elif isinstance(m, SparseLinear):
            new = _dense_linear(m)
            sparse.add(name)
        else:
            continue
        _set_module(model, name, new)
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())

    prepared = PreparedStudent(model, fake_quant=fake)
    if keep_masks:
        _add_masks(prepared, sparse)
    model.train()
    return prepared


def _add_masks(prepared: PreparedStudent, sparse: set[str]) -> None:
    """Mask the non-zeros of every pruned linear (`sparse`: names of former SparseLinears, pruned by definition)."""
    hooked = set()
    for name, m in prepared.model.named_modules():
        if not (is_linear(m) or isinstance(m, _FakeQuant)) or not (name in sparse or _pruned(m.weight)):
            continue
        mask = m.weight.detach() != 0
        m.register_buffer("mask", mask, persistent=False)
        prepared.masks[name] = mask
        if id(m.weight) not in hooked:  # a weight shared by two masked modules: one hook
            hooked.add(id(m.weight))
            prepared.hooks.append(m.weight.register_hook(functools.partial(_mask_grad, m)))


# --- smaller student ---------------------------------------------------------------------------------------

def _check_size(name: str, value, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name} must be a whole number between 1 and {limit} (the teacher's), got {value!r}")
    return value


def _select_layers(cfg, picked: list[int]) -> None:
    """Update a config for a student made of the teacher's layers `picked` (0-based, in order)."""
    for key in PER_LAYER_CONFIG_LISTS:
        values = getattr(cfg, key, None)
        if values is not None:
            setattr(cfg, key, [values[i] for i in picked])
    if getattr(cfg, "max_window_layers", None) is not None:  # Qwen2: layers below this index use sliding windows
        cfg.max_window_layers = sum(1 for i in picked if i < cfg.max_window_layers)
    cfg.num_hidden_layers = len(picked)


def _layers_state(state: dict, prefix: str, picked: list[int]) -> dict:
    """The teacher's state dict with decoder layer picked[i] renamed to layer i and the other layers left out."""
    new_index = {t: s for s, t in enumerate(picked)}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix + "."):
            out[key] = value
            continue
        index, _, rest = key[len(prefix) + 1:].partition(".")
        if int(index) in new_index:
            out[f"{prefix}.{new_index[int(index)]}.{rest}"] = value
    return out


def smaller_student(teacher: nn.Module, num_layers: int | None = None, hidden_size: int | None = None,
                    intermediate_size: int | None = None) -> tuple[nn.Module, dict]:
    """A smaller model of the teacher's architecture, on its device and in its dtype, with an info dict
    (init: "teacher layers [...]" (0-based indices of the copied decoder layers) or "random"; params; the sizes).

    Fewer layers only: embeddings, final norm and lm_head are copied and student layer i is a copy of the
    teacher layer layer_map picks for it (evenly spaced, the last one kept). A different hidden or MLP width
    cannot reuse the teacher's weights: random initialisation."""
    cfg = copy.deepcopy(teacher.config)
    n_teacher = getattr(cfg, "num_hidden_layers", None)
    if n_teacher is None:
        raise UnsupportedError(f"a smaller student needs a config with num_hidden_layers "
                               f"({type(cfg).__name__} has none)")
    n_student = n_teacher if num_layers is None else _check_size("num_layers", num_layers, n_teacher)
    widths = {}
    for key, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if value is None:
            continue
        current = getattr(cfg, key, None)
        if current is None:
            raise UnsupportedError(f"this model's config ({type(cfg).__name__}) has no {key} to change")
        if _check_size(key, value, current) != current:
            widths[key] = value
    if "hidden_size" in widths:
        heads = cfg.num_attention_heads
        if widths["hidden_size"] % heads or (widths["hidden_size"] // heads) % 2:
            raise ValueError(f"hidden_size must be a multiple of 2 x num_attention_heads = {2 * heads} (an even "
                             f"head size, which rotary embeddings need), got {widths['hidden_size']}")
        cfg.head_dim = widths["hidden_size"] // heads
    for key, value in widths.items():
        setattr(cfg, key, value)
    picked = [t - 1 for _, t in layer_map(n_student, n_teacher)]
    if n_student != n_teacher:
        _select_layers(cfg, picked)

    ref = next(teacher.parameters())
    student = type(teacher)(cfg).to(device=ref.device, dtype=ref.dtype)  # fresh modules: layer_idx 0..n-1
    if widths:
        init = "random"
    else:
        prefix, _ = find_decoder_layers(teacher)
        student.load_state_dict(_layers_state(teacher.state_dict(), prefix, picked))  # strict: every weight copied
        init = f"teacher layers {picked}"
    info = {"init": init, "params": sum(p.numel() for p in student.parameters()), "num_layers": n_student,
            "hidden_size": getattr(cfg, "hidden_size", None),
            "intermediate_size": getattr(cfg, "intermediate_size", None)}
    return student, info
