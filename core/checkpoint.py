"""Save a compressed model and load it back without recompressing.

A checkpoint is a directory:
  config.json, generation_config.json   the transformers config (model.config.save_pretrained)
  tokenizer files                       tokenizer.save_pretrained
  model.safetensors                     the state dict exactly as stored in memory: packed uint8 codes, float16
                                        scales, uint8 zeros, int8 / float8_e4m3fn qweights, float32 weight scales,
                                        and the untouched float tensors; a tensor shared by several names (tied
                                        embedding / lm_head) is written once, under its first name
  slimlm_quant.json                     written last: format_version, slimlm_version, the weights file's size and
                                        sha256, the float dtype, per compressed module its format name and
                                        constructor arguments, the tied names ({alias: name in the file}), and
                                        `info` (the steps that made it, base model, date)

Formats are a registry keyed by module class (FORMATS: class -> Format(name, to_config, from_config, check,
to_saved)), so a new compressed module plugs in with one register_format() call. Built in: "packed-int"
(QuantLinear), "w8a8-int8" / "w8a8-fp8" (W8A8Linear / FP8Linear) and "sparse" (core.prune.sparse.SparseLinear:
its `storage` "bitmask" (values [nnz] + 1-bit mask; nnz varies per layer and is recorded), "nm" (values +
packed in-group positions; n, m recorded) or "csr" (values [nnz] + uint8 column indices + int32 row pointers);
a CUDA-only "semi_structured" module is written as its "nm" 2:4 equivalent, so it loads as "nm").

Loading builds the model from its config with its parameters on the meta device
(accelerate.init_empty_weights(include_buffers=False): buffers computed at construction, such as rotary inv_freq,
which the file does not hold, stay real), swaps the listed modules for meta-device instances of their class, checks
every name / shape / dtype against the file, then assigns the file's tensors (load_state_dict(assign=True): no
float weight is allocated twice, none for replaced modules), restores the ties, runs each format's consistency check
on the loaded data (e.g. a sparse mask whose set bits do not match the number of values: a corrupt file whose
checksum was not recorded) and returns the model in eval mode.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from . import paths
from .errors import ModelLoadError, UnsupportedError
from .models import sha256_file

FORMAT_VERSION = 1
QUANT_CONFIG = "slimlm_quant.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ModelLoadError):
    """A slimlm compressed checkpoint that cannot be read (missing, corrupt, newer or unknown format)."""


class Format(NamedTuple):
    name: str
    to_config: Callable[[nn.Module], dict]  # module -> JSON-able constructor arguments
    from_config: Callable[[dict], nn.Module]  # those arguments -> an empty module on the meta device
    check: Callable[[nn.Module], str | None] | None = None  # loaded module -> why its data is inconsistent, or None
    to_saved: Callable[[nn.Module], nn.Module] | None = None  # module -> the module written in its place


FORMATS: dict[type, Format] = {}


def register_format(cls: type, name: str, to_config: Callable[[nn.Module], dict],
                    from_config: Callable[[dict], nn.Module], check: Callable[[nn.Module], str | None] | None = None,
                    to_saved: Callable[[nn.Module], nn.Module] | None = None) -> None:
    """Make `cls` savable: `to_config(module)` gives its constructor arguments, `from_config(args)` an empty
    instance (meta device) whose state_dict names, shapes and dtypes match what the module stores. Optional:
    `check(module)` after loading says why the loaded data is inconsistent (None: fine); `to_saved(module)` gives
    the module to write instead (e.g. a portable layout of a device-only one; itself for most)."""
    FORMATS[cls] = Format(name, to_config, from_config, check, to_saved)


def _register_builtin() -> None:
    from .quant.linear import QuantLinear
    from .quant.w8a8 import FP8Linear, W8A8Linear

    def linear_dims(m) -> dict:
        return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}

    register_format(
        QuantLinear, "packed-int",
        lambda m: {**linear_dims(m), "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric},
        lambda c: QuantLinear(c["in_features"], c["out_features"], c["bits"], c["group_size"], c["symmetric"],
                              bias=c["bias"], device="meta"))
    for cls in (W8A8Linear, FP8Linear):
        register_format(cls, f"w8a8-{cls.scheme}", linear_dims,
                        lambda c, cls=cls: cls(c["in_features"], c["out_features"], bias=c["bias"], device="meta"))

    from .prune.sparse import SparseLinear

    def float_dtype(name) -> torch.dtype:
        dt = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"{name!r} is not a floating-point dtype")
        return dt

    def sparse_config(m) -> dict:
        c = {**linear_dims(m), "storage": m.format, "dtype": str(m.values.dtype).removeprefix("torch.")}
        if m.format == "nm":
            c.update(n=m.n, m=m.m)
        else:  # bitmask / csr: the number of stored values varies per layer
            c["nnz"] = m.values.numel()
        if m.bias is not None and m.bias.dtype != m.values.dtype:
            c["bias_dtype"] = str(m.bias.dtype).removeprefix("torch.")
        return c

    register_format(
        SparseLinear, "sparse", sparse_config,
        lambda c: SparseLinear.empty(c["in_features"], c["out_features"], c["storage"], c.get("n"), c.get("m"),
                                     bias=c["bias"], dtype=float_dtype(c["dtype"]), nnz=c.get("nnz"),
                                     bias_dtype=float_dtype(c["bias_dtype"]) if "bias_dtype" in c else None),
        check=SparseLinear.check, to_saved=SparseLinear.portable)


_register_builtin()


def slimlm_version() -> str:
    try:
        return tomllib.loads((paths.REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        try:
            from importlib.metadata import version

            return version("slimlm")
        except Exception:
            return "unknown"


def is_compressed_checkpoint(path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


# --- saving ----------------------------------------------------------------------------------------

def _check_savable(model: nn.Module) -> None:
    for name, m in model.named_modules():
        cls = type(m)
        if cls in FORMATS:
            continue
        if cls.__module__.startswith("bitsandbytes"):
            raise UnsupportedError(f"Layer '{name}' is a bitsandbytes {cls.__name__}: bitsandbytes quantizes while "
                                   "loading, so such a model cannot be saved in slimlm's format (run the bnb step on "
                                   "the base model instead).")
        if not cls.__module__.startswith(("torch.", "transformers.")):
            raise UnsupportedError(f"Layer '{name}' is a {cls.__module__}.{cls.__name__}, which has no checkpoint "
                                   f"format (known: {', '.join(f.name for f in FORMATS.values())}); it cannot be saved.")


def _storage_key(t: torch.Tensor):
    return (t.device.type, t.untyped_storage().data_ptr())


def _tensors_to_save(model: nn.Module, saved_as: dict[str, nn.Module] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> CPU contiguous tensor, each distinct tensor once; alias name -> name it is stored under).
    saved_as: module name -> the module whose tensors are written in its place (Format.to_saved)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_of: dict[int, str] = {}
    storages: set = set()
    state = model.state_dict(keep_vars=True)
    if saved_as:
        state = {k: t for k, t in state.items() if not any(k.startswith(f"{p}.") for p in saved_as)}
        for p, module in saved_as.items():
            state.update({f"{p}.{k}": t for k, t in module.state_dict(keep_vars=True).items()})
    for name, t in state.items():
        if id(t) in first_of:
            tied[name] = first_of[id(t)]
            continue
        first_of[id(t)] = name
        if t.device.type == "meta":
            raise UnsupportedError(f"Tensor '{name}' has no data (meta device): the model is not fully loaded.")
        data = t.detach()
        key = _storage_key(data)
        if key in storages or not data.is_contiguous():
            data = data.clone(memory_format=torch.contiguous_format)  # a view into another tensor: its own copy
        storages.add(key)
        tensors[name] = data.cpu()
    return tensors, tied


def _float_dtype(model: nn.Module, compressed: set[str]) -> str:
    for name, p in model.named_parameters():
        if p.is_floating_point() and name.rpartition(".")[0] not in compressed:
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def save_compressed(model: nn.Module, tokenizer, out_dir, info: dict | None = None, overwrite: bool = False) -> Path:
    """Write `model` (compressed or not), its config and `tokenizer` (may be None) to `out_dir`.
    Written into a temporary directory beside it and renamed at the end: a crash leaves no half checkpoint."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UnsupportedError(f"{out_dir} already exists: choose another place to save the model.")
    _check_savable(model)
    saved_as = {}  # modules written as another module (Format.to_saved), e.g. CUDA 2:4 semi-structured -> "nm"
    for name, m in model.named_modules():
        fmt = FORMATS.get(type(m))
        if fmt is not None and fmt.to_saved is not None and (other := fmt.to_saved(m)) is not m:
            saved_as[name] = other
    modules = {name: {"format": FORMATS[type(m)].name, **FORMATS[type(m)].to_config(saved_as.get(name, m))}
               for name, m in model.named_modules() if type(m) in FORMATS}
    tensors, tied = _tensors_to_save(model, saved_as)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weights = tmp / WEIGHTS_FILE
        save_file(tensors, str(weights), metadata={"format": "pt", "slimlm_format_version": str(FORMAT_VERSION)})
        meta = {
            "format_version": FORMAT_VERSION,
            "slimlm_version": slimlm_version(),
            "weights_file": WEIGHTS_FILE,
            "weights_bytes": weights.stat().st_size,
            "weights_sha256": sha256_file(weights),
            "dtype": _float_dtype(model, set(modules)),
            "modules": modules,
            "tied": tied,
            "info": {"saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(info or {})},
        }
        (tmp / QUANT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")  # last: its presence means complete
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def directory_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_run_model(exp, src, model: nn.Module, tokenizer, model_info: dict, baseline_bytes: int, out_dir) -> dict:
    """Save a run's compressed model with its provenance; returns metrics["saved_model"]. A model that came
    from a compressed checkpoint keeps that checkpoint's provenance (the steps that made it)."""
    if src.kind == "compressed":
        info = {k: v for k, v in ((src.checkpoint or {}).get("info") or {}).items() if k != "saved"}
    else:
        info = {
            "base_model": exp.model, "base_model_name": model_info.get("name"), "base_params": model_info.get("params"),
            "source_note": src.note, "steps": [s.model_dump() for s in exp.steps],
            "step_labels": [s.label() for s in exp.steps], "label": exp.label(), "dtype": exp.dtype,
            "baseline_weight_bytes": baseline_bytes,
        }
    path = save_compressed(model, tokenizer, out_dir, info, overwrite=True).resolve()
    return {"path": str(path), "bytes": directory_bytes(path), "weights_bytes": (path / WEIGHTS_FILE).stat().st_size}


# --- loading ---------------------------------------------------------------------------------------

def read_quant_config(path) -> dict:
    """slimlm_quant.json of a checkpoint directory, validated (CheckpointError otherwise)."""
    path = Path(path)
    f = path / QUANT_CONFIG
    if not f.is_file():
        raise CheckpointError(f"{path} is not a slimlm compressed checkpoint: {QUANT_CONFIG} is missing "
                              "(it is written last, so the save may have been interrupted).")
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is unreadable or not valid JSON ({e}).") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        raise CheckpointError(f"{f} has no integer format_version: not a slimlm checkpoint description.")
    version = meta["format_version"]
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{f} has format_version {version} (written by slimlm {meta.get('slimlm_version', '?')}); "
                              f"this slimlm ({slimlm_version()}) reads versions up to {FORMAT_VERSION}: upgrade slimlm.")
    if version < 1:
        raise CheckpointError(f"{f} has an invalid format_version {version}.")
    if not isinstance(meta.get("modules", {}), dict) or not isinstance(meta.get("tied", {}), dict):
        raise CheckpointError(f"{f}: 'modules' and 'tied' must be objects.")
    by_name = {fmt.name: fmt for fmt in FORMATS.values()}
    for name, entry in meta.get("modules", {}).items():
        fmt = entry.get("format") if isinstance(entry, dict) else None
        if fmt not in by_name:
            raise CheckpointError(f"{f}: module '{name}' has format {fmt!r}, unknown to this slimlm "
                                  f"({slimlm_version()}; it knows {', '.join(sorted(by_name))}).")
    return meta


def check_not_partial(path) -> None:
    """Refuse a directory whose weights file was written by save_compressed but whose slimlm_quant.json is
    missing: loaded as a plain transformers checkpoint, its compressed layers would be silently random."""
    f = Path(path) / WEIGHTS_FILE
    if not f.is_file():
        return
    try:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as sf:
            metadata = sf.metadata() or {}
    except Exception:
        return  # not ours to judge: transformers reports a broken file itself
    if "slimlm_format_version" in metadata:
        raise CheckpointError(f"{f} holds a slimlm compressed model but {Path(path) / QUANT_CONFIG} is missing "
                              "(it is written last, so the save may have been interrupted): save it again.")


def compressed_note(meta: dict) -> str:
    info = meta.get("info") or {}
    labels = info.get("step_labels") or []
    made = " + ".join(labels) if labels else "no compression step"
    note = (f"A compressed checkpoint saved by slimlm {meta.get('slimlm_version', '?')} ({info.get('saved', 'date unknown')}): "
            f"{info.get('base_model', 'unknown base model')} after {made}. It is measured as stored (not re-quantized); "
            "without its float model there is no KL or top-1 agreement.")
    if info.get("source_note"):
        note += f" About the base model: {info['source_note']}"
    return note


def checkpoint_summary(location, meta: dict) -> dict:
    """What model_info adds for a compressed checkpoint: a name, the base model's parameter count, provenance."""
    info = meta.get("info") or {}
    labels = info.get("step_labels") or []
    out = {
        "name": f"{info.get('base_model_name') or info.get('base_model') or location} "
                f"(compressed: {' + '.join(labels) if labels else 'no steps'})",
        "compressed_checkpoint": {
            "path": str(location), "steps": labels, "base_model": info.get("base_model"), "saved": info.get("saved"),
            "slimlm_version": meta.get("slimlm_version"), "format_version": meta.get("format_version"),
            "compressed_modules": len(meta.get("modules") or {}),
        },
    }
    if info.get("base_params"):
        out["params"] = info["base_params"]
    return out


def _read_weights(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = path / meta.get("weights_file", WEIGHTS_FILE)
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: the checkpoint is incomplete.")
    size, expected = f.stat().st_size, meta.get("weights_bytes")
    if expected is not None and size != expected:
        raise CheckpointError(f"{f} is {size} bytes but {QUANT_CONFIG} says {expected}: the file is truncated or "
                              "was replaced.")
    if meta.get("weights_sha256") and sha256_file(f) != meta["weights_sha256"]:
        raise CheckpointError(f"{f} is corrupt: its sha256 does not match the one recorded in {QUANT_CONFIG}.")
    try:
        return load_file(str(f), device="cpu")
    except Exception as e:  # SafetensorError: bad header, truncated, ...
        raise CheckpointError(f"{f} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]}).") from None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _tie(model: nn.Module, alias: str, target: str) -> None:
    mod_name, _, attr = alias.rpartition(".")
    src_name, _, src_attr = target.rpartition(".")
    module, src = model.get_submodule(mod_name), model.get_submodule(src_name)
    if src_attr in src._parameters:
        setattr(module, attr, src._parameters[src_attr])
    else:
        module._buffers[attr] = src._buffers[src_attr]


def _names(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _check_state(f: Path, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], exact: set[str]) -> None:
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        parts = ([f"missing {len(missing)} tensor(s): {_names(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)} tensor(s): {_names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{f} does not match the model described by its config and {QUANT_CONFIG}: "
                              + "; ".join(parts) + ".")
    bad = []
    for k, want in expected.items():
        got = state[k]
        same_kind = got.dtype == want.dtype or (k not in exact and got.is_floating_point() and want.is_floating_point())
        if tuple(got.shape) != tuple(want.shape) or not same_kind:
            bad.append(f"{k}: file {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}")
    if bad:
        raise CheckpointError(f"{f} holds tensors of the wrong shape or dtype: " + "; ".join(bad[:5])
                              + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") + ".")


def load_compressed(path, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the model saved by save_compressed (eval mode, on `device`). Every tensor comes back in the dtype it
    was saved in; a `dtype` other than the saved float dtype then casts the model (QuantLinear and W8A8Linear keep
    their storage dtypes through .to(); a new format should do the same; a SparseLinear's `values` are float
    weights and are cast like them, its mask / indices are not)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .models import _check_causal

    path = Path(path)
    meta = read_quant_config(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"{path}: could not read config.json ({str(e).splitlines()[0][:200]}).") from None
    _check_causal(config, str(path))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    by_name = {fmt.name: fmt for fmt in FORMATS.values()}
    exact: set[str] = set()  # names whose dtype must match exactly (compressed storage)
    for name, entry in meta.get("modules", {}).items():
        try:
            model.get_submodule(name)
            new = by_name[entry["format"]].from_config(entry)
        except AttributeError:
            raise CheckpointError(f"{path / QUANT_CONFIG}: module '{name}' does not exist in this "
                                  f"{type(model).__name__}.") from None
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path / QUANT_CONFIG}: bad arguments for module '{name}' "
                                  f"(format {entry['format']}): {type(e).__name__}: {e}.") from None
        _set_module(model, name, new)
        exact.update(f"{name}.{k}" for k in new.state_dict())

    f = path / meta.get("weights_file", WEIGHTS_FILE)
    state = _read_weights(path, meta)
    tied = meta.get("tied", {})
    for alias, target in tied.items():
        if target not in state:
            raise CheckpointError(f"{f}: '{alias}' is tied to '{target}', which the file does not hold.")
        state[alias] = state[target]
    _check_state(f, model.state_dict(keep_vars=True), state, exact)
    model.load_state_dict(state, strict=True, assign=True)
    for alias, target in tied.items():
        _tie(model, alias, target)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{f}: no data for {_names(leftover)}.")
    for name, entry in meta.get("modules", {}).items():
        check = by_name[entry["format"]].check
        why = check(model.get_submodule(name)) if check is not None else None
        if why:
            raise CheckpointError(f"{f} is corrupt: module '{name}' ({entry['format']}"
                                  f"{' ' + entry['storage'] if isinstance(entry.get('storage'), str) else ''}): "
                                  f"{why}.")
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except Exception:
            pass  # generation settings only affect sample generations
    # Buffers the file does not hold (computed at construction, e.g. rotary inv_freq) follow the saved float dtype,
    # as they did in the model that was saved (model.to(dtype) casts them too).
    saved_dtype = getattr(torch, meta.get("dtype", "float32"), torch.float32)
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            b = module._buffers.get(name)
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(saved_dtype)
    model.to(device)
    if dtype is not None and dtype != saved_dtype:
        model.to(dtype)  # compressed modules keep their storage dtypes (their _apply)
    return model.eval()
