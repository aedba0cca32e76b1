"""Roofline cost model of transformer inference (Pope et al. 2022, "Efficiently Scaling Transformer
Inference"; the same arithmetic as the well-known "transformer inference arithmetic" note).

A phase takes max(time to move its bytes, time to do its FLOPs): decode at small batch reads every
weight once per step and is memory-bound; prefill and large-batch decode are compute-bound. All
functions are pure (no streamlit, no torch) except `probe_host`, which times this machine.

Units: bytes, FLOPs, seconds inside; GB = 1e9 bytes and TFLOP/s = 1e12 (spec-sheet units);
latencies returned in milliseconds.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

GB = 1e9
TERA = 1e12


# -- model shape ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that the cost model needs."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated_mlp: bool = True      # Llama-style gate/up/down (3 matrices) vs GPT-2/OPT fc1/fc2 (2)
    qkv_bias: bool = False      # Qwen2
    all_bias: bool = False      # GPT-2 / OPT / Phi-1/2: every linear has a bias
    layernorm: bool = False     # LayerNorm (weight + bias) instead of RMSNorm (weight)
    positions: int = 0          # learned position-embedding rows (GPT-2, OPT)
    norms_per_layer: int = 2    # 1 for Phi-1/2's parallel block
    head_bias: bool = False     # Phi-1/2's lm_head has a bias

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of the linears of ONE decoder layer."""
        h, i = self.hidden, self.intermediate
        attn = [(self.q_dim, h), (self.kv_dim, h), (self.kv_dim, h), (h, self.q_dim)]
        mlp = [(i, h), (i, h), (h, i)] if self.gated_mlp else [(i, h), (h, i)]
        return attn + mlp


# Real dimensions, from each model's config.json on the Hugging Face hub.
PRESET_MODELS: dict[str, ModelShape] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): 134,515,008 params (slimlm's default model)
    "SmolLM2-135M": ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 64, 49152, tied=True),
    # meta-llama/Meta-Llama-3-8B: 8,030,261,248 params
    "Llama-3-8B": ModelShape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128, 128256, tied=False),
    # meta-llama/Meta-Llama-3-70B: 70,553,706,496 params
    "Llama-3-70B": ModelShape("Llama-3-70B", 8192, 28672, 80, 64, 8, 128, 128256, tied=False),
    # Qwen/Qwen2.5-7B: 7,615,616,512 params (biases on q/k/v)
    "Qwen2.5-7B": ModelShape("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 128, 152064, tied=False, qkv_bias=True),
}
# slimlm model specs (core.models.BUILTIN_MODELS) that have a preset here
BUILTIN_SHAPES = {"smollm2-135m": "SmolLM2-135M"}

_NOT_GATED = {"gpt2", "opt", "phi", "gpt_neox", "gptj", "falcon", "bloom", "gpt_bigcode", "codegen"}
_ALL_BIAS = {"gpt2", "opt", "phi", "gpt_neox", "gptj", "bloom", "gpt_bigcode", "codegen"}


def _first(cfg, *names, default=None):
    for n in names:
        v = cfg.get(n) if isinstance(cfg, Mapping) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def shape_from_config(config, name: str | None = None) -> ModelShape:
    """ModelShape from a transformers config (a PretrainedConfig, its dict, or a path to a
    config.json / checkpoint directory). Reads the Llama/Qwen2/Mistral/Gemma names
    (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    head_dim), GPT-2's (n_embd, n_inner, n_layer, n_head, n_positions) and OPT's (ffn_dim).
    Raises ValueError naming a missing field."""
    if isinstance(config, (str, Path)):
        p = Path(config).expanduser()
        p = p / "config.json" if p.is_dir() else p
        config = json.loads(p.read_text())
    if isinstance(config, Mapping) and isinstance(config.get("text_config"), Mapping):
        config = {**config, **config["text_config"]}  # multimodal wrappers (Gemma 3, ...)
    elif not isinstance(config, Mapping) and getattr(config, "text_config", None) is not None:
        config = config.text_config
    mtype = str(_first(config, "model_type", default="")).lower()
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head")
    vocab = _first(config, "vocab_size")
    for what, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("num_attention_heads", heads),
                    ("vocab_size", vocab)):
        if not v:
            raise ValueError(f"model config has no {what}: not a decoder-only transformer config this model knows")
    kv = _first(config, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv is None:
        kv = 1 if _first(config, "multi_query", default=False) else heads
    inter = _first(config, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", default=4 * hidden)
    head_dim = _first(config, "head_dim") or hidden // heads
    positions = 0
    if mtype == "gpt2":
        positions = _first(config, "n_positions", "max_position_embeddings", default=0)
    elif mtype == "opt":
        positions = _first(config, "max_position_embeddings", default=0) + 2  # OPT offsets positions by 2
    return ModelShape(
        name=name or str(_first(config, "_name_or_path", "name_or_path", default="") or mtype or "model"),
        hidden=int(hidden), intermediate=int(inter), layers=int(layers), heads=int(heads), kv_heads=int(kv),
        head_dim=int(head_dim), vocab=int(vocab), tied=bool(_first(config, "tie_word_embeddings", default=True)),
        gated_mlp=mtype not in _NOT_GATED, qkv_bias=mtype == "qwen2" or bool(_first(config, "attention_bias", default=False)),
        all_bias=mtype in _ALL_BIAS, layernorm=mtype in _NOT_GATED, positions=int(positions),
        norms_per_layer={"phi": 1, "gemma2": 4, "gemma3_text": 4, "gemma3": 4}.get(mtype, 2), head_bias=mtype == "phi",
    )


def shape_for_model(spec: str) -> ModelShape:
    """The shape of a slimlm model spec: a preset name, a built-in alias, a checkpoint directory or
    config.json, or a hub id (its config is fetched by transformers; needs network the first time)."""
    if spec in PRESET_MODELS:
        return PRESET_MODELS[spec]
    if spec in BUILTIN_SHAPES:
        return PRESET_MODELS[BUILTIN_SHAPES[spec]]
    p = Path(spec).expanduser()
    if p.is_dir() or p.name == "config.json":
        return shape_from_config(p, name=spec)
    from transformers import AutoConfig  # a hub id or a .gguf converted into the cache

    from ..models import resolve

    return shape_from_config(AutoConfig.from_pretrained(resolve(spec).location, trust_remote_code=False), name=spec)


def param_counts(shape: ModelShape) -> dict[str, int]:
    """Parameter counts: linear (all decoder-layer matmul weights + their biases), embedding,
    lm_head (0 when tied to the embedding), other (norms, position embeddings), total."""
    s = shape
    per_layer = sum(o * i for o, i in s.linear_shapes())
    if s.all_bias:
        per_layer += sum(o for o, _ in s.linear_shapes())
    elif s.qkv_bias:
        per_layer += s.q_dim + 2 * s.kv_dim
    norm = (2 if s.layernorm else 1) * s.hidden
    out = {
        "linear": s.layers * per_layer,
        "embedding": s.vocab * s.hidden,
        "lm_head": 0 if s.tied else s.vocab * s.hidden,
        "other": s.layers * s.norms_per_layer * norm + norm + s.positions * s.hidden + (s.vocab if s.head_bias else 0),
    }
    out["total"] = sum(out.values())
    return out


# -- compression settings ------------------------------------------------------------------------
ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Setting:
    """How the decoder-layer linears are stored and multiplied.

    Bytes of an (out, in) linear = out*in*density*bits/8 (stored values)
      + out*in*index_bits/8 (sparsity metadata)
      + out*ceil(in/g)*(scale_bytes + zero_bytes) (one scale per group of g input columns; g=None:
        one per output channel; quantized only).
    `compute` is the tensor-core rate the matmul runs at: "int8"/"fp8" for W8A8, else the activation
    dtype. Embedding, lm_head (unless quantize_lm_head), norms and the KV cache stay in `act`."""

    name: str
    bits: float = 16            # bits per stored weight value
    quantized: bool = False     # carries scales (and zero points)
    group_size: int | None = None
    scale_bytes: float = 2.0    # fp16 scales
    zero_bytes: float = 0.0     # asymmetric zero points (slimlm stores them as uint8: 1 byte)
    density: float = 1.0        # fraction of weights stored (sparse formats)
    index_bits: float = 0.0     # metadata bits per dense weight position
    act: str = "bf16"           # activation dtype: fp32 | bf16 | fp16
    compute: str = "bf16"       # fp32 | bf16 | fp16 | int8 | fp8
    flop_fraction: float = 1.0  # share of dense linear FLOPs executed (0.5 for 2:4 on sparse tensor cores)
    kv_dtype_bytes: float | None = None
    quantize_lm_head: bool = False

    @property
    def act_bytes(self) -> int:
        return ACT_BYTES[self.act]

    @property
    def kv_bytes(self) -> float:
        return self.act_bytes if self.kv_dtype_bytes is None else self.kv_dtype_bytes

    @property
    def sparse24(self) -> bool:
        return self.flop_fraction < 1.0


def float_setting(act: str = "bf16") -> Setting:
    return Setting(act, bits=8 * ACT_BYTES[act], act=act, compute=act)


def weight_only(bits: int, group_size: int | None = 128, symmetric: bool = True, act: str = "bf16",
                name: str | None = None) -> Setting:
    """intN weights (fp16 scale per group, plus a uint8 zero point if asymmetric), dequantized into
    `act` and multiplied at the activation dtype's rate (W4A16 etc.)."""
    g = f"g{group_size}" if group_size else "per-channel"
    default = f"int{bits} {g}{'' if symmetric else ' asym'} (W{bits}A16)" if act != "fp32" else \
        f"int{bits} {g}{'' if symmetric else ' asym'} ({act})"
    return Setting(name or default, bits=bits, quantized=True, group_size=group_size,
                   zero_bytes=0.0 if symmetric else 1.0, act=act, compute=act)


def w8a8(scheme: str = "int8", act: str = "bf16") -> Setting:
    """8-bit weights with one fp16 scale per output channel, activations quantized per token:
    the matmul runs at the int8 / fp8 tensor-core rate."""
    return Setting("FP8 W8A8" if scheme == "fp8" else "W8A8 int8", bits=8, quantized=True, act=act, compute=scheme)


def nf4(double_quant: bool = False, act: str = "bf16") -> Setting:
    """bitsandbytes NF4: 4-bit codes, one absmax per block of 64 weights, fp32 (4 bytes); with double
    quantization the absmax is 8-bit plus one fp32 per 256 blocks (1 + 4/256 bytes per block)."""
    return Setting("NF4 (bnb, block 64" + (", double quant)" if double_quant else ")"), bits=4, quantized=True,
                   group_size=64, scale_bytes=1 + 4 / 256 if double_quant else 4.0, act=act, compute=act)


def sparse_24(act: str = "bf16") -> Setting:
    """2:4 semi-structured sparsity: half the values in `act`, plus 2 bits of position metadata per
    kept value (= 1 bit per dense position); sparse tensor cores do half the FLOPs."""
    return Setting(f"2:4 sparse {act}", bits=8 * ACT_BYTES[act], density=0.5, index_bits=1.0, act=act,
                   compute=act, flop_fraction=0.5)


def unstructured_50(act: str = "bf16") -> Setting:
    """50% unstructured sparsity stored as values + a 1-bit-per-position bitmask; the matmul runs dense."""
    return Setting(f"50% unstructured {act} (bitmask)", bits=8 * ACT_BYTES[act], density=0.5, index_bits=1.0,
                   act=act, compute=act)


PRESET_SETTINGS: dict[str, Setting] = {s.name: s for s in (
    float_setting("fp32"), float_setting("bf16"), float_setting("fp16"),
    weight_only(8, None, name="int8 per-channel (W8A16)"), w8a8("int8"), w8a8("fp8"),
    weight_only(4, 128), weight_only(4, 128, symmetric=False), weight_only(4, 32),
    weight_only(3, 128), weight_only(2, 64), nf4(), nf4(double_quant=True), sparse_24(), unstructured_50(),
)}


def linear_bytes(setting: Setting, out_features: int, in_features: int) -> float:
    """Bytes of one (out, in) linear weight in this setting (formula in Setting's docstring)."""
    n = out_features * in_features
    b = n * setting.density * setting.bits / 8 + n * setting.index_bits / 8
    if setting.quantized:
        groups = math.ceil(in_features / setting.group_size) if setting.group_size else 1
        b += out_features * groups * (setting.scale_bytes + setting.zero_bytes)
    return b


def bytes_per_weight(setting: Setting, in_features: int = 4096) -> float:
    """Average bytes per weight of a linear with this many input columns; e.g. int4 g128 sym:
    0.5 + 2/128, bf16: 2, 2:4 bf16: 0.5*2 + 1/8."""
    return linear_bytes(setting, 1, in_features) / in_features


def weight_bytes(shape: ModelShape, setting: Setting) -> dict[str, float]:
    """Resident weight bytes: linears in the setting's format; embedding, norms, biases and (unless
    quantize_lm_head) the lm_head in the activation dtype; a tied lm_head counted once unless it is
    quantized (then the float embedding and the quantized head are both stored)."""
    pc = param_counts(shape)
    per_layer = sum(linear_bytes(setting, o, i) for o, i in shape.linear_shapes())
    a = setting.act_bytes
    linear = shape.layers * per_layer + (pc["linear"] - shape.layers * sum(o * i for o, i in shape.linear_shapes())) * a
    embedding = pc["embedding"] * a
    if setting.quantize_lm_head:
        lm_head = linear_bytes(setting, shape.vocab, shape.hidden)
    else:
        lm_head = pc["lm_head"] * a
    other = pc["other"] * a
    total = linear + embedding + lm_head + other
    # what one decode step reads: all but the embedding table (B rows of it are negligible); a tied,
    # unquantized lm_head IS the embedding table and is read in full by the output projection
    head_read = lm_head if (lm_head or setting.quantize_lm_head) else embedding
    return {"linear": linear, "embedding": embedding, "lm_head": lm_head, "other": other, "total": total,
            "read_per_step": linear + head_read + other}


def kv_bytes_per_token(shape: ModelShape, kv_bytes: float = 2) -> float:
    """KV cache per token of one sequence: 2 (K and V) x layers x kv_heads x head_dim x bytes.
    Llama-3-8B bf16: 2*32*8*128*2 = 131072 bytes."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_bytes


def kv_cache_bytes(shape: ModelShape, setting: Setting, batch: int, context: int) -> float:
    """KV cache of `batch` sequences of `context` tokens: kv_bytes_per_token x batch x context."""
    return kv_bytes_per_token(shape, setting.kv_bytes) * batch * context


def activation_bytes(shape: ModelShape, setting: Setting, batch: int, prompt_len: int) -> float:
    """Rough prefill activation peak, unchunked and with flash attention (no PxP score matrix):
    batch x prompt x act_bytes x (2*hidden + q_dim + 2*kv_dim + 2*intermediate) -- residual, normed
    input, q/k/v and the two MLP up-projections of one layer alive at once -- plus the fp32 logits of
    the last position, batch x vocab x 4."""
    per_token = 2 * shape.hidden + shape.q_dim + 2 * shape.kv_dim + 2 * shape.intermediate
    return batch * (prompt_len * per_token * setting.act_bytes + shape.vocab * 4)


# -- hardware --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """A device as the roofline sees it. Peak rates are dense (no sparsity) spec-sheet numbers;
    None = no such tensor-core path (then the matmul runs at the activation dtype's rate).
    price_per_hour is an editable assumption (typical on-demand cloud price of one device)."""

    name: str
    kind: str                 # "gpu" | "cpu"
    bandwidth_gbs: float      # memory bandwidth, GB/s
    bf16_tflops: float        # dense bf16/fp16 FLOP/s, in TFLOP/s
    fp32_tflops: float
    memory_gb: float
    price_per_hour: float
    int8_tops: float | None = None
    fp8_tflops: float | None = None
    sparse24: bool = False    # sparse tensor cores (2:4 runs at 2x the dense rate)
    bw_efficiency: float = 0.8    # achievable fraction of peak bandwidth
    flop_efficiency: float = 0.6  # achievable fraction of peak FLOP/s
    mem_utilization: float = 0.9  # fraction of memory usable for weights + KV + activations
    match: tuple[str, ...] = ()   # substrings of a recorded GPU name that mean this device
    # Calibration to measured kernels (empty / 0 = pure roofline). kernel_bw: (format, batch, fraction of peak
    # bandwidth the weight matmuls of that format reach at that decode batch); layer_overhead_us: time per decoder
    # layer per decode step beyond the roofline (launches, norms, rotary, short attention).
    kernel_bw: tuple[tuple[str, int, float], ...] = ()
    layer_overhead_us: float = 0.0
    # (format, batch, µs): per-layer time a format's kernels save from layer_overhead_us at exactly that batch, where
    # they do work that is a separate kernel in the bf16 loop the overhead was fitted to (e.g. the 4-bit GEMV's
    # epilogues at batch 1)
    overhead_saving_us: tuple[tuple[str, int, float], ...] = ()
    calibration: str = ""

    def peak_flops(self, compute: str) -> float:
        """Peak FLOP/s of a compute kind; int8/fp8 fall back to the bf16 rate when absent."""
        if compute == "fp32":
            return self.fp32_tflops * TERA
        if compute == "int8" and self.int8_tops:
            return self.int8_tops * TERA
        if compute == "fp8" and self.fp8_tflops:
            return self.fp8_tflops * TERA
        return self.bf16_tflops * TERA

    def flops(self, compute: str) -> float:
        """Achievable FLOP/s: peak x flop_efficiency."""
        return self.peak_flops(compute) * self.flop_efficiency

    @property
    def bandwidth(self) -> float:
        """Achievable bytes/s: peak x bw_efficiency."""
        return self.bandwidth_gbs * GB * self.bw_efficiency

    def supports(self, compute: str) -> bool:
        return compute in ("fp32", "bf16", "fp16") or bool(self.int8_tops if compute == "int8" else self.fp8_tflops)


def cpu_profile(name: str = "CPU server (32 cores, 8x DDR5-4800)", cores: int = 32, ghz: float = 2.5,
                fp32_flops_per_cycle: int = 64, channels: int = 8, mts: int = 4800, memory_gb: float = 128,
                price_per_hour: float = 2.9) -> Hardware:
    """A CPU from its parts: bandwidth = channels x MT/s x 8 bytes; fp32 peak = cores x GHz x
    FLOP/cycle (AVX-512: 2 FMA units x 16 lanes x 2 = 64). bf16 is taken at the fp32 rate (no AMX)
    and int8 at 4x (AVX-512 VNNI)."""
    fp32 = cores * ghz * 1e9 * fp32_flops_per_cycle / TERA
    return Hardware(name, "cpu", bandwidth_gbs=channels * mts * 1e6 * 8 / GB, bf16_tflops=fp32, fp32_tflops=fp32,
                    memory_gb=memory_gb, price_per_hour=price_per_hour, int8_tops=4 * fp32)


# Achieved fraction of peak bandwidth of a Llama-3-8B layer's weight matmuls per format and decode batch, slimlm's
# kernels on an H100 (see the calibrated presets below), with the layer as the decode loop runs it since session 11:
# q/k/v and gate/up stacked (core.merge), so q/k/v 6144x4096, o, gate/up 28672x4096, down
# (benchmarks/results/gpu_kernels_merged_s11.json; int4 from its "no PDL" column, int4-asym scaled by int4's no-PDL /
# PDL ratio). The seven separate matmuls reached less: dense 0.732 / int4 0.542 / int8 0.550 / fp8 0.535 at batch 1
# (results/gpu_kernels_h100_s9.json, _s10b.json).
_H100_KERNEL_BW = (("dense", 1, 0.789), ("dense", 4, 0.789), ("dense", 16, 0.780), ("dense", 64, 0.768),
                   ("int4", 1, 0.620), ("int4", 4, 0.475), ("int4", 16, 0.387), ("int4", 64, 0.200),
                   ("int4-asym", 1, 0.614), ("int4-asym", 16, 0.330),
                   ("int8", 1, 0.690), ("int8", 4, 0.574), ("int8", 16, 0.550), ("int8", 64, 0.335),
                   ("w8a8-fp8", 1, 0.649), ("w8a8-fp8", 4, 0.647), ("w8a8-fp8", 16, 0.634), ("w8a8-fp8", 64, 0.512),
                   ("w8a8-int8", 1, 0.284), ("w8a8-int8", 4, 0.272), ("w8a8-int8", 16, 0.248),
                   ("w8a8-int8", 64, 0.226))


# Per-layer overhead the CUDA-graph loop saves on an H100 where slimlm's kernels do more than the matmul. int4 at
# batch 1: the GEMV's epilogues (silu * up, the rotary embedding with the cache write, both residual adds) replace
# four to five of bf16's kernels, and its matmuls launch with PDL. Fitted to W4A16 batch 1 of
# results/gpu_decode_s12_final.json (2.386 ms/step, against 2.791 with bf16's 20.4 us/layer), then checked on two
# later runs of the same code (benchmarks/RESULTS.md, session 13).
_H100_GRAPH_SAVINGS = (("int4", 1, 12.7),)


PRESET_HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3 at 3.35 TB/s; BF16 1,979 / FP8 3,958 / INT8 3,958 TFLOPS
    # "with sparsity" -> half dense; FP32 67 TFLOPS. ~$3/h on-demand (specialised clouds, 2024-25).
    Hardware("H100 SXM", "gpu", 3350, 989.5, 67, 80, 3.0, int8_tops=1979, fp8_tflops=1979, sparse24=True,
             match=("H100",)),
    # NVIDIA H200 datasheet: 141 GB HBM3e at 4.8 TB/s; same tensor cores as H100 SXM. ~$4/h.
    Hardware("H200", "gpu", 4800, 989.5, 67, 141, 4.0, int8_tops=1979, fp8_tflops=1979, sparse24=True,
             match=("H200",)),
    # NVIDIA A100 80GB SXM datasheet: 2,039 GB/s HBM2e; BF16 312, INT8 624 TOPS dense; FP32 19.5; no FP8.
    # ~$1.8/h.
    Hardware("A100 80GB", "gpu", 2039, 312, 19.5, 80, 1.8, int8_tops=624, sparse24=True, match=("A100",)),
    # NVIDIA L4 datasheet: 24 GB GDDR6 at 300 GB/s; BF16 242, FP8 485, INT8 485 "with sparsity" -> half
    # dense; FP32 30.3. ~$0.8/h (e.g. a GCP g2 instance).
    Hardware("L4", "gpu", 300, 121, 30.3, 24, 0.8, int8_tops=242.5, fp8_tflops=242.5, sparse24=True, match=("L4",)),
    # The H100 as slimlm's own kernels and CUDA-graph decode loop run on it (measured 2026-11-26,
    # benchmarks/RESULTS.md "Cost model calibrated to slimlm's kernels"): the achieved bandwidth of the weight
    # matmuls of a Llama-3-8B layer (q, k, v, o, gate, up, down at their shapes) per format and batch, from
    # benchmarks/gpu_kernels.py (results/gpu_kernels_h100.json; session 5: int4 from results/gpu_kernels_h100_mma.json
    # (bf16-pair GEMV at batch 1, mma kernel at 2..16), int4-asym / int8 at batch 1 from
    # results/gpu_kernels_h100_pairs.json; session 6: w8a8-fp8 from results/gpu_kernels_fp8_skinny.json, the
    # decode-sized FP8 kernel at batch <= 16; session 9: int4 from results/gpu_kernels_h100_s9.json's "no PDL"
    # column, as PDL did not change the decode step; session 11: the merged layer, _H100_KERNEL_BW above), and the
    # per-layer step overhead fitted to one decode measurement (bf16, batch 1, merged projections and the rotary +
    # cache kernel: results/gpu_decode_s11.json, 6.34 ms/step; merged alone: 44.1 us/layer; session 7 with the
    # separate projections: 45.8; session 6 without the attention kernel: 51.6, before core.fusion: 77).
    Hardware("H100 SXM (slimlm kernels, measured)", "gpu", 3350, 989.5, 67, 80, 3.0, int8_tops=1979,
             fp8_tflops=1979, sparse24=True, match=("H100",),
             kernel_bw=_H100_KERNEL_BW, layer_overhead_us=20.4, overhead_saving_us=_H100_GRAPH_SAVINGS,
             calibration="slimlm's Triton/cuBLAS kernels and CUDA-graph decode loop on an H100 80GB HBM3, "
                         "measured 2026-11-26"),
    # The same kernels with the decode step torch.compile'd before graph capture (the small ops fused): the
    # per-layer overhead fitted to bf16 batch 1 compiled + graph (6.18 ms/step, merged projections and the rotary +
    # cache kernel, results/gpu_decode_s11.json; merged alone: 17.2 us/layer; session 7 with the separate
    # projections: 18.1; 23.2 before the decode attention kernel).
    Hardware("H100 SXM (slimlm kernels, compiled step)", "gpu", 3350, 989.5, 67, 80, 3.0, int8_tops=1979,
             fp8_tflops=1979, sparse24=True, match=("H100",), kernel_bw=_H100_KERNEL_BW, layer_overhead_us=15.5,
             calibration="slimlm's Triton/cuBLAS kernels and compiled CUDA-graph decode loop on an H100 80GB HBM3, "
                         "measured 2026-11-26"),
    # A generic x86 server: 32 cores at 2.5 GHz with AVX-512, 8 channels of DDR5-4800 (307 GB/s),
    # ~$2.9/h (a 64-vCPU on-demand instance). All editable.
    cpu_profile(),
)}
DEFAULT_HARDWARE = "H100 SXM"


def probe_host(seconds: float = 0.5) -> Hardware:
    """Time this machine (not pure): copy bandwidth with numpy (2 x bytes per copy, STREAM's
    convention) and fp32 matmul FLOP/s with torch. The numbers are achieved rates, so the
    efficiency factors are 1. Memory is total RAM; price 0 (set your own)."""
    import os
    import time

    import numpy as np
    import psutil
    import torch

    a = np.ones(32 * 2**20, dtype=np.float32)  # 128 MiB, far above any cache
    b = np.empty_like(a)

    def best_time(fn) -> float:
        """Fastest of repeated calls of fn within seconds / 2 (after one warm-up call)."""
        fn()
        best, t_end = math.inf, time.perf_counter() + seconds / 2
        while time.perf_counter() < t_end or best == math.inf:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    bw = 2 * a.nbytes / best_time(lambda: np.copyto(b, a))
    n = 1024
    x, y = torch.randn(n, n), torch.randn(n, n)
    fl = 2 * n**3 / best_time(lambda: torch.mm(x, y)) / TERA
    return Hardware(f"This machine ({os.cpu_count()} CPUs, measured)", "cpu", bandwidth_gbs=bw / GB, bf16_tflops=fl,
                    fp32_tflops=fl, memory_gb=psutil.virtual_memory().total / GB, price_per_hour=0.0,
                    bw_efficiency=1.0, flop_efficiency=1.0)


# -- estimates -------------------------------------------------------------------------------------
def matmul_params(shape: ModelShape) -> int:
    """Weights multiplied per token: all decoder linears plus the lm_head (vocab x hidden, also when
    tied); the embedding lookup does no FLOPs."""
    return param_counts(shape)["linear"] + shape.vocab * shape.hidden


def roofline_s(flop_time_s: float, nbytes: float, hw: Hardware) -> tuple[float, str]:
    """Roofline: time = max(compute time, bytes / achievable bandwidth); the bound is whichever is larger."""
    mem = nbytes / hw.bandwidth
    return (mem, "memory") if mem >= flop_time_s else (flop_time_s, "compute")


def _linear_rate(setting: Setting, hw: Hardware) -> float:
    rate = hw.flops(setting.compute)
    return rate * (2 if setting.sparse24 and hw.sparse24 else 1)


def prefill_flops(shape: ModelShape, batch: int, prompt_len: int) -> dict[str, float]:
    """Prefill FLOPs: linear = 2 x linear params x B x P; lm_head = 2 x vocab x hidden x B (last
    position's logits only, as slimlm and generate() do); attention (causal, QK^T and AV) =
    2 x layers x B x P^2 x q_dim."""
    n_lin = param_counts(shape)["linear"]
    return {"linear": 2 * n_lin * batch * prompt_len, "head": 2 * shape.vocab * shape.hidden * batch,
            "attention": 2 * shape.layers * batch * prompt_len**2 * shape.q_dim}


def decode_flops(shape: ModelShape, batch: int, context: float) -> dict[str, float]:
    """One decode step: linear = 2 x linear params x B, lm_head = 2 x vocab x hidden x B,
    attention = 4 x layers x B x context x q_dim (QK^T and AV over the cached context)."""
    n_lin = param_counts(shape)["linear"]
    return {"linear": 2 * n_lin * batch, "head": 2 * shape.vocab * shape.hidden * batch,
            "attention": 4 * shape.layers * batch * context * shape.q_dim}


def _compute_time(fl: dict, setting: Setting, hw: Hardware) -> float:
    # linears at the setting's rate (x setting.flop_fraction on sparse tensor cores is the 2x above);
    # lm_head and attention at the activation dtype's rate
    return fl["linear"] / _linear_rate(setting, hw) + (fl["head"] + fl["attention"]) / hw.flops(setting.act)


def prefill_time(shape: ModelShape, setting: Setting, hw: Hardware, batch: int, prompt_len: int) -> tuple[float, str]:
    """Prefill seconds = max(FLOPs / FLOP/s, bytes / BW); bytes = weights read once + KV written."""
    nbytes = weight_bytes(shape, setting)["read_per_step"] + kv_cache_bytes(shape, setting, batch, prompt_len)
    return roofline_s(_compute_time(prefill_flops(shape, batch, prompt_len), setting, hw), nbytes, hw)


def kernel_format(setting: Setting) -> str:
    """The key of a setting's weight matmul in Hardware.kernel_bw ('' = no such measurement)."""
    if setting.compute in ("int8", "fp8"):
        return f"w8a8-{setting.compute}"
    if setting.quantized and setting.bits in (4, 8) and setting.scale_bytes == 2.0 and setting.density == 1:
        return f"int{int(setting.bits)}" + ("-asym" if setting.zero_bytes else "")
    if not setting.quantized and setting.density == 1 and setting.index_bits == 0:
        return "dense"
    return ""


def measured_bw_fraction(hw: Hardware, fmt: str, batch: int) -> float | None:
    """Fraction of peak bandwidth hw.kernel_bw gives for `fmt` at `batch`: linear in log(batch) between the
    measured batches, the nearest one outside them; None when the format was not measured."""
    pts = sorted((b, f) for k, b, f in hw.kernel_bw if k == fmt)
    if not pts:
        return None
    if batch <= pts[0][0]:
        return pts[0][1]
    for (b0, f0), (b1, f1) in zip(pts, pts[1:]):
        if batch <= b1:
            t = math.log(batch / b0) / math.log(b1 / b0)
            return f0 + t * (f1 - f0)
    return pts[-1][1]


def decode_step_time(shape: ModelShape, setting: Setting, hw: Hardware, batch: int, context: float) -> tuple[float, str]:
    """Seconds of one decode step = max((weight bytes + KV bytes read) / BW, decode FLOPs / FLOP/s),
    KV read = kv_bytes_per_token x B x context. A calibrated profile (hw.kernel_bw) moves the decoder linears at
    their format's measured bandwidth and the rest (lm_head, norms) at the dense one, and adds
    layers x the per-layer overhead (layer_overhead_us())."""
    wb = weight_bytes(shape, setting)
    kv = kv_cache_bytes(shape, setting, batch, context)
    compute = _compute_time(decode_flops(shape, batch, context), setting, hw)
    lin_frac = measured_bw_fraction(hw, kernel_format(setting), batch)
    if lin_frac is None:
        t, bound = roofline_s(compute, wb["read_per_step"] + kv, hw)
    else:
        peak = hw.bandwidth_gbs * GB
        rest_frac = measured_bw_fraction(hw, "dense", batch) or hw.bw_efficiency
        mem = wb["linear"] / (peak * lin_frac) + (wb["read_per_step"] - wb["linear"]) / (peak * rest_frac) \
            + kv / hw.bandwidth
        t, bound = (mem, "memory") if mem >= compute else (compute, "compute")
    return t + shape.layers * layer_overhead_us(hw, kernel_format(setting), batch) * 1e-6, bound


def layer_overhead_us(hw: Hardware, fmt: str, batch: int) -> float:
    """Per-layer decode-step overhead of format `fmt` at `batch`: hw.layer_overhead_us less the format's saving
    at that batch (hw.overhead_saving_us), never below 0."""
    saving = next((us for k, b, us in hw.overhead_saving_us if k == fmt and b == batch), 0.0)
    return max(0.0, hw.layer_overhead_us - saving)


def crossover_batch(shape: ModelShape, setting: Setting, hw: Hardware, context: float = 0) -> float:
    """Decode batch where compute time catches up with memory time. Ignoring KV and attention
    (context=0) it is FLOP/s / BW x (weight bytes / (2 x matmul params)) ~= FLOP/s / BW x bytes per
    param / 2 (bf16 on H100 at 0.6/0.8 efficiency: 593.7e12 / 2.68e12 ~= 221). With context c:
    W / BW = B (2N/F + attn(c)/F - kv(c)/BW); inf when KV reads grow faster than the FLOPs."""
    w = weight_bytes(shape, setting)["read_per_step"] / hw.bandwidth
    per_b = _compute_time(decode_flops(shape, 1, context), setting, hw) - kv_cache_bytes(shape, setting, 1, context) / hw.bandwidth
    return w / per_b if per_b > 0 else math.inf


def memory_needed(shape: ModelShape, setting: Setting, batch: int, prompt_len: int, gen_tokens: int) -> float:
    """Weights + KV cache of B x (P + T) tokens + the rough prefill activation peak."""
    return (weight_bytes(shape, setting)["total"] + kv_cache_bytes(shape, setting, batch, prompt_len + gen_tokens)
            + activation_bytes(shape, setting, batch, prompt_len))


def max_batch(shape: ModelShape, setting: Setting, hw: Hardware, prompt_len: int, gen_tokens: int) -> int:
    """Largest B with weights + B x (KV per sequence + activations per sequence) <= memory x
    mem_utilization (the rest is headroom for the runtime); 0 when not even one sequence fits."""
    usable = hw.memory_gb * GB * hw.mem_utilization - weight_bytes(shape, setting)["total"]
    per_seq = kv_cache_bytes(shape, setting, 1, prompt_len + gen_tokens) + activation_bytes(shape, setting, 1, prompt_len)
    return max(0, math.floor(usable / per_seq)) if usable > 0 else 0


def cost_per_million_tokens(price_per_hour: float, tokens_per_s: float) -> float:
    """Dollars per 1e6 tokens = price per hour / (3600 x tokens/s) x 1e6."""
    return price_per_hour / (3600 * tokens_per_s) * 1e6 if tokens_per_s > 0 else math.inf


@dataclass
class Estimate:
    setting: str
    hardware: str
    batch: int
    prompt_len: int
    gen_tokens: int
    weight_bytes: float
    kv_bytes: float
    activation_bytes: float
    memory_bytes: float
    usable_bytes: float
    fits: bool
    max_batch: int
    prefill_ms: float
    prefill_bound: str
    decode_ms: float            # mean step over the T generated tokens
    decode_bound: str
    decode_tokens_per_s: float  # B / decode step
    tokens_per_s: float         # B x T / (prefill + T x decode step): static batching, end to end
    cost_per_million: float     # $ per 1e6 generated tokens at tokens_per_s
    crossover_batch: float
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "notes"}


def estimate(shape: ModelShape, setting: Setting, hw: Hardware, batch: int = 1, prompt_len: int = 128,
             gen_tokens: int = 128) -> Estimate:
    """Everything for one (model, setting, hardware, B, P, T). Decode latency is the step at the
    mean context P + T/2 (the step time is linear in context, so it is the mean step). Raises
    ValueError on nonsensical inputs."""
    for what, v, lo in (("batch size", batch, 1), ("prompt length", prompt_len, 1), ("generated tokens", gen_tokens, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{what} must be an integer >= {lo}, got {v!r}")
    for what, v in (("memory bandwidth", hw.bandwidth_gbs), ("bf16 FLOP/s", hw.bf16_tflops),
                    ("fp32 FLOP/s", hw.fp32_tflops), ("memory", hw.memory_gb)):
        if not v or v <= 0:
            raise ValueError(f"{hw.name}: {what} must be > 0")
    for what, v in (("bandwidth efficiency", hw.bw_efficiency), ("FLOP/s efficiency", hw.flop_efficiency),
                    ("memory utilization", hw.mem_utilization)):
        if not 0 < v <= 1:
            raise ValueError(f"{hw.name}: {what} must be in (0, 1], got {v}")
    notes = []
    if hw.kernel_bw:
        if measured_bw_fraction(hw, kernel_format(setting), batch) is None:
            notes.append(f"{hw.name} has no measurement for {setting.name}: its linears are taken at the "
                         f"bandwidth efficiency ({hw.bw_efficiency:.2f}), plus the measured per-layer overhead.")
    if not hw.supports(setting.compute):
        notes.append(f"{hw.name} has no {setting.compute} tensor cores: the matmul is taken at the {setting.act} rate.")
    if setting.sparse24 and not hw.sparse24:
        notes.append(f"{hw.name} has no sparse tensor cores: 2:4 saves memory only.")
    w = weight_bytes(shape, setting)["total"]
    kv = kv_cache_bytes(shape, setting, batch, prompt_len + gen_tokens)
    act = activation_bytes(shape, setting, batch, prompt_len)
    pre_s, pre_bound = prefill_time(shape, setting, hw, batch, prompt_len)
    dec_s, dec_bound = decode_step_time(shape, setting, hw, batch, prompt_len + gen_tokens / 2)
    tps = batch * gen_tokens / (pre_s + gen_tokens * dec_s)
    mb = max_batch(shape, setting, hw, prompt_len, gen_tokens)
    return Estimate(
        setting=setting.name, hardware=hw.name, batch=batch, prompt_len=prompt_len, gen_tokens=gen_tokens,
        weight_bytes=w, kv_bytes=kv, activation_bytes=act, memory_bytes=w + kv + act,
        usable_bytes=hw.memory_gb * GB * hw.mem_utilization, fits=batch <= mb, max_batch=mb,
        prefill_ms=pre_s * 1e3, prefill_bound=pre_bound, decode_ms=dec_s * 1e3, decode_bound=dec_bound,
        decode_tokens_per_s=batch / dec_s, tokens_per_s=tps, cost_per_million=cost_per_million_tokens(hw.price_per_hour, tps),
        crossover_batch=crossover_batch(shape, setting, hw, prompt_len + gen_tokens / 2), notes=notes,
    )


def sweep_batches(shape: ModelShape, setting: Setting, hw: Hardware, prompt_len: int, gen_tokens: int,
                  batches: Iterable[int] | None = None) -> list[dict]:
    """estimate() rows over batch sizes (default powers of two up to 1024 and past the memory limit)."""
    if batches is None:
        top = max(1024, 2 * max_batch(shape, setting, hw, prompt_len, gen_tokens))
        batches = [2**k for k in range(int(math.log2(min(top, 65536))) + 1)]
    return [estimate(shape, setting, hw, b, prompt_len, gen_tokens).row() for b in batches]


# -- measured points -------------------------------------------------------------------------------
def setting_for_experiment(exp) -> Setting:
    """The cost-model Setting of a stored run's Experiment (core.recipe): the activation dtype is
    the run's dtype; the last weight-format step decides the linears' storage."""
    act = exp.dtype
    s = float_setting(act)
    for step in exp.steps:
        skip = getattr(step, "skip", None)  # bitsandbytes steps have none and keep lm_head in float
        head = skip is not None and "lm_head" not in skip
        if step.method in ("rtn", "gptq"):
            s = weight_only(step.bits, step.group_size, step.symmetric, act=act)
        elif step.method == "w8a8":
            s = w8a8(step.scheme, act=act)
        elif step.method == "bnb":
            if step.mode == "int8":  # LLM.int8: int8 rows with an fp32 scale each, int8 matmul
                s = Setting("bnb LLM.int8", bits=8, quantized=True, scale_bytes=4.0, act=step.compute_dtype,
                            compute="int8")
            else:  # FP4 has the same layout as NF4
                s = replace(nf4(step.double_quant, act=step.compute_dtype),
                            name=f"bnb {step.mode.upper()}" + (" +DQ" if step.double_quant else ""))
        s = replace(s, quantize_lm_head=head and s.bits < 16)
    return replace(s, name=exp.label())


def measured_points(runs: Iterable) -> list[dict]:
    """One point per (finished run, measured batch size) from core.store Runs: run id, label, model
    spec, Setting, batch, decode ms per step (median), prefill ms (median, batch 1, only on the
    batch-1 point), prompt length, decode tokens, device (cpu / cuda:N) and GPU/CPU name."""
    out = []
    for r in runs:
        lat = (r.metrics or {}).get("latency") or {}
        if r.status != "done" or not lat:
            continue
        env = r.metrics.get("env") or {}
        base = {"run_id": r.id, "label": r.label, "model": r.experiment.model, "setting": setting_for_experiment(r.experiment),
                "prompt_len": lat.get("prompt_len") or r.experiment.measure.prompt_len,
                "decode_tokens": lat.get("decode_tokens") or r.experiment.measure.decode_tokens,
                "device": lat.get("device") or env.get("device") or r.experiment.device,
                "device_name": env.get("gpu") or env.get("cpu")}
        prefill = (lat.get("prefill_ms") or {}).get("median")
        steps = {t["batch"]: t.get("step_ms_median") for t in lat.get("throughput") or [] if t.get("batch")}
        if 1 not in steps and (lat.get("decode_ms") or {}).get("median") is not None:
            steps[1] = lat["decode_ms"]["median"]
        for b in sorted(steps):
            if steps[b] is not None:
                out.append({**base, "batch": int(b), "decode_ms": float(steps[b]),
                            "prefill_ms": float(prefill) if b == 1 and prefill is not None else None})
    return out


def device_matches(point: Mapping, hw: Hardware) -> bool:
    """Whether a measured point ran on the kind of device this profile describes: any CPU for a CPU
    profile, a GPU whose recorded name contains one of hw.match for a GPU profile."""
    dev = str(point.get("device") or "")
    if hw.kind == "cpu":
        return dev == "cpu"
    name = str(point.get("device_name") or "")
    return dev.startswith("cuda") and any(m.lower() in name.lower() for m in hw.match)


def compare_measured(points: Iterable[Mapping], hw: Hardware,
                     shape_of: Callable[[str], ModelShape | None] = lambda spec: None) -> list[dict]:
    """The points that ran on a device matching `hw`, each with the estimate for its own model,
    setting, batch, prompt length and decode tokens, and ratio = measured / estimate (>1: slower
    than the roofline). Points whose model shape is unknown (shape_of returns None) are dropped."""
    out = []
    for p in points:
        if not device_matches(p, hw):
            continue
        shape = shape_of(p["model"])
        if shape is None:
            continue
        e = estimate(shape, p["setting"], hw, p["batch"], int(p["prompt_len"]), int(p["decode_tokens"]))
        pre = p.get("prefill_ms")
        out.append({**{k: v for k, v in p.items() if k != "setting"}, "setting": p["setting"].name,
                    "model_shape": shape.name,
                    "est_decode_ms": e.decode_ms, "decode_ratio": p["decode_ms"] / e.decode_ms,
                    "est_prefill_ms": e.prefill_ms if pre is not None else None,
                    "prefill_ratio": pre / e.prefill_ms if pre is not None else None})
    return out
