"""Structured pruning: a genuinely smaller dense model that is still a plain transformers checkpoint.

Llama-family decoders only (model_type llama, qwen2, mistral; SmolLM2 is Llama): others raise UnsupportedError.
Importance comes from one calibration pass over the dense model (core.calibrate.run_calibrated; nothing is
changed during it), then everything is removed at once:

- MLP intermediate channels: score_j = ||a_j||_2 * ||W_down[:, j]||_2, a_j the input of down_proj (act(gate) *
  up) for channel j over the calibration tokens. That product is exactly the Frobenius norm of channel j's
  contribution a_j W_down[:, j]^T to the MLP output on those tokens. Removing channel j drops row j of gate/up
  and column j of down.
- Attention heads: score_h = ||A_h W_o[:, h]^T||_F, the exact norm of query head h's contribution to o_proj's
  output, from the Gram matrix of o_proj's input. head_mode "query" (default) removes query heads within each
  KV group (the same number in every group, so repeat_kv's contiguous grouping still holds; K/V are kept);
  "kv_group" removes whole KV groups (a KV head and its query heads; group score = root-sum-square of its
  heads' scores), which also shrinks the KV cache.
- Decoder layers: ShortGPT's block influence BI = 1 - mean over tokens of cos(layer input, layer output);
  the layers with the lowest BI go. num_hidden_layers, every attention's layer_idx (KV-cache slot) and
  config.layer_types are updated.

Counts are uniform across layers (each layer picks its own channels / heads): Llama's config has one
intermediate_size, num_attention_heads and num_key_value_heads for all layers, and transformers 5 has no
per-layer sizes for these architectures, so per-layer counts would not reload with transformers alone.
config.head_dim is written explicitly, since hidden_size / num_attention_heads no longer gives it.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import (
    CalibrationRecords,
    LayerContext,
    Observer,
    run_calibrated,
)
from ..errors import UnsupportedError

SUPPORTED = ("llama", "qwen2", "mistral")
HEAD_MODES = ("query", "kv_group")


def check_supported(model: nn.Module) -> None:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED:
        raise UnsupportedError(f"Structured pruning supports Llama-family models ({', '.join(SUPPORTED)}); "
                               f"this model is {mt or type(model).__name__}.")
    layers = getattr(getattr(model, "model", None), "layers", None)
    need = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UnsupportedError("Structured pruning found no model.layers stack in this model.")
    for layer in layers:
        for n in need:
            try:
                m = layer.get_submodule(n)
            except AttributeError:
                raise UnsupportedError(f"Structured pruning needs {n} in every decoder layer.") from None
            if type(m) is not nn.Linear:
                raise UnsupportedError(f"Structured pruning needs float nn.Linear layers ({n} is {type(m).__name__}):"
                                       " run it before quantization.")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once (parameters() de-duplicates)


class ImportanceObserver(Observer):
    """Collects, per decoder layer, MLP channel scores, query head scores and block influence. Changes nothing."""

    name = "structured importance"

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self.act_sumsq: dict[str, torch.Tensor] = {}
        self.o_gram: dict[str, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}
        self.heads: dict[int, torch.Tensor] = {}
        self.influence: dict[int, float] = {}

    def observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        f = x.reshape(-1, x.shape[-1]).float()
        if name.endswith("mlp.down_proj"):
            s = (f * f).sum(0)
            self.act_sumsq[name] = self.act_sumsq[name] + s if name in self.act_sumsq else s
        elif name.endswith("self_attn.o_proj"):
            g = f.t() @ f
            self.o_gram[name] = self.o_gram[name] + g if name in self.o_gram else g

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.act_sumsq.values(), *self.o_gram.values()])

    def apply(self, ctx: LayerContext) -> list[dict]:
        layer = ctx.layer
        down = layer.mlp.down_proj.weight.detach().float()
        sumsq = self.act_sumsq.pop(f"{ctx.name}.mlp.down_proj", None)
        if sumsq is not None:
            self.mlp[ctx.index] = sumsq.sqrt() * down.norm(dim=0)
        o = layer.self_attn.o_proj.weight.detach().float()
        G = self.o_gram.pop(f"{ctx.name}.self_attn.o_proj", None)
        if G is not None:
            d = self.head_dim
            self.heads[ctx.index] = torch.stack([
                ((o[:, h * d:(h + 1) * d] @ G[h * d:(h + 1) * d, h * d:(h + 1) * d]) * o[:, h * d:(h + 1) * d])
                .sum().clamp_min(0).sqrt() for h in range(o.shape[1] // d)])
        inputs = []

        def grab(mod, args, kwargs):
            inputs.append(args[0] if args else kwargs["hidden_states"])

        hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            outputs = ctx.run()
        finally:
            hook.remove()
        cos = sum(F.cosine_similarity(a.float(), b.float(), dim=-1).sum().item() for a, b in zip(inputs, outputs))
        tokens = sum(a.numel() // a.shape[-1] for a in inputs)
        self.influence[ctx.index] = 1 - cos / tokens
        return []


def _keep_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[idx].clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[idx].clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features = len(idx)


def _keep_cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[:, idx].clone(), requires_grad=lin.weight.requires_grad)
    lin.in_features = len(idx)


def _head_rows(heads: list[int], d: int, device) -> torch.Tensor:
    return torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long, device=device)


def _plan_heads(scores: torch.Tensor, n_kv: int, group: int, remove: int, mode: str) -> tuple[list[int], list[int]]:
    """(kept query heads, kept kv heads), each sorted. remove: query heads per group ("query") or groups."""
    if mode == "query":
        keep_q = []
        for g in range(n_kv):
            s = scores[g * group:(g + 1) * group]
            keep_q += sorted(g * group + int(i) for i in torch.topk(s, group - remove).indices)
        return keep_q, list(range(n_kv))
    gs = scores.view(n_kv, group).pow(2).sum(1)
    keep_kv = sorted(int(i) for i in torch.topk(gs, n_kv - remove).indices)
    return [g * group + j for g in keep_kv for j in range(group)], keep_kv


def structured_prune(model: nn.Module, step, windows: torch.Tensor, device="cpu",
                     progress: Callable[[str, int, int], None] | None = None) -> CalibrationRecords:
    """Remove MLP channels, attention heads and/or decoder layers of a Llama-family model in place.

    step: mlp_sparsity (fraction of intermediate channels removed in every layer, 0..1, default 0),
    head_sparsity (fraction of query heads removed, default 0; rounded to whole heads per KV group for
    head_mode "query", to whole KV groups for "kv_group"), head_mode ("query" | "kv_group"),
    remove_layers (number of decoder layers removed, default 0). All optional attributes (getattr).
    windows: calibration token ids [n, window_len]. Returns CalibrationRecords: one record per original decoder
    layer (name, kind "structured", block_influence, removed (the whole layer), mlp_channels_removed,
    heads_removed (query head indices), kv_heads_removed), .stats = the pass's figures + params_before,
    params_after, removed_layers, intermediate_size, num_attention_heads, num_key_value_heads.
    """
    check_supported(model)
    cfg = model.config
    mlp_frac = float(getattr(step, "mlp_sparsity", 0) or 0)
    head_frac = float(getattr(step, "head_sparsity", 0) or 0)
    n_remove_layers = int(getattr(step, "remove_layers", 0) or 0)
    mode = getattr(step, "head_mode", None) or "query"
    if mode not in HEAD_MODES:
        raise UnsupportedError(f"head_mode must be one of {HEAD_MODES}, got {mode!r}")
    if not (0 <= mlp_frac < 1 and 0 <= head_frac < 1):
        raise UnsupportedError("mlp_sparsity and head_sparsity must be in [0, 1).")
    layers = model.model.layers
    n_layers = len(layers)
    if not 0 <= n_remove_layers < n_layers:
        raise UnsupportedError(f"remove_layers must be between 0 and {n_layers - 1} for this {n_layers}-layer model.")
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    group = n_heads // n_kv
    inter = cfg.intermediate_size
    k_mlp = round(mlp_frac * inter)
    h_remove = round(head_frac * (group if mode == "query" else n_kv))
    if k_mlp >= inter:
        raise UnsupportedError("mlp_sparsity would remove every MLP channel.")
    if head_frac and h_remove == 0:
        raise UnsupportedError(f"head_sparsity={head_frac:g} rounds to no head: this model has {n_kv} KV groups of "
                               f"{group} query heads ({mode} mode removes whole "
                               f"{'heads per group' if mode == 'query' else 'groups'}).")
    if h_remove >= (group if mode == "query" else n_kv):
        raise UnsupportedError("head_sparsity would remove every attention head.")

    params_before = param_count(model)
    obs = ImportanceObserver(head_dim)
    _, stats = run_calibrated(model, windows, obs, device, progress)
    t0 = time.perf_counter()
    bi = [obs.influence.get(i, float("inf")) for i in range(n_layers)]
    drop = set(sorted(range(n_layers), key=lambda i: bi[i])[:n_remove_layers])
    records = []
    for i, layer in enumerate(layers):
        rec = {"name": f"model.layers.{i}", "kind": "structured", "method": "structured",
               "block_influence": bi[i], "removed": i in drop, "mlp_channels_removed": 0, "heads_removed": [],
               "kv_heads_removed": [], "rel_error": None}
        records.append(rec)
        if i in drop:
            continue
        dev = layer.mlp.down_proj.weight.device
        if k_mlp:
            s = obs.mlp.get(i)
            if s is None:  # no calibration signal: weight norms alone
                s = layer.mlp.down_proj.weight.detach().float().norm(dim=0)
            keep = torch.topk(s, inter - k_mlp).indices.sort().values.to(dev)
            _keep_rows(layer.mlp.gate_proj, keep)
            _keep_rows(layer.mlp.up_proj, keep)
            _keep_cols(layer.mlp.down_proj, keep)
            rec["mlp_channels_removed"] = k_mlp
        if h_remove:
            s = obs.heads.get(i)
            if s is None:
                o = layer.self_attn.o_proj.weight.detach().float()
                s = torch.stack([o[:, h * head_dim:(h + 1) * head_dim].norm() for h in range(n_heads)])
            keep_q, keep_kv = _plan_heads(s, n_kv, group, h_remove, mode)
            attn = layer.self_attn
            _keep_rows(attn.q_proj, _head_rows(keep_q, head_dim, dev))
            _keep_cols(attn.o_proj, _head_rows(keep_q, head_dim, dev))
            if len(keep_kv) < n_kv:
                _keep_rows(attn.k_proj, _head_rows(keep_kv, head_dim, dev))
                _keep_rows(attn.v_proj, _head_rows(keep_kv, head_dim, dev))
            attn.num_key_value_groups = len(keep_q) // len(keep_kv)
            rec["heads_removed"] = sorted(set(range(n_heads)) - set(keep_q))
            rec["kv_heads_removed"] = sorted(set(range(n_kv)) - set(keep_kv))

    kept = [i for i in range(n_layers) if i not in drop]
    if drop:
        model.model.layers = nn.ModuleList([layers[i] for i in kept])
        for new, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = new
            if hasattr(layer, "layer_idx"):
                layer.layer_idx = new
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [cfg.layer_types[i] for i in kept]
            if hasattr(model.model, "has_sliding_layers"):
                model.model.has_sliding_layers = "sliding_attention" in cfg.layer_types
        if getattr(cfg, "max_window_layers", None) is not None:
            cfg.max_window_layers = sum(1 for i in kept if i < cfg.max_window_layers)
        cfg.num_hidden_layers = len(kept)
    cfg.head_dim = head_dim
    if k_mlp:
        cfg.intermediate_size = inter - k_mlp
    if h_remove:
        if mode == "query":
            cfg.num_attention_heads = n_kv * (group - h_remove)
        else:
            cfg.num_key_value_heads = n_kv - h_remove
            cfg.num_attention_heads = (n_kv - h_remove) * group
    stats = {**stats, "seconds": stats["seconds"] + time.perf_counter() - t0, "params_before": params_before,
             "params_after": param_count(model), "removed_layers": sorted(drop),
             "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
             "num_key_value_heads": cfg.num_key_value_heads, "num_hidden_layers": cfg.num_hidden_layers}
    return CalibrationRecords(records, stats)
