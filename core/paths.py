"""Where slimlm keeps downloaded assets (cache) and results (store + artifacts)."""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"


def cache_dir() -> Path:
    """Downloaded and converted assets (default model, corpus). Outside git."""
    return Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))


def data_dir() -> Path:
    """The results store (SQLite) and run artifacts."""
    return Path(os.environ.get("SLIMLM_DATA", Path.home() / ".local" / "share" / "slimlm"))


def store_path() -> Path:
    return data_dir() / "slimlm.sqlite"


def artifacts_dir() -> Path:
    return data_dir() / "artifacts"
