"""Write the exact token windows slimlm uses, for the llm-compressor peer run (run.py).

Run with the PROJECT venv (it imports slimlm's core):

  .venv/bin/python benchmarks/llmcompressor/export_windows.py /tmp/lc_windows.pt [--quick]

Saves a torch file with:
  calibration  LongTensor [n_calib, window_len]  data.calibration_windows(tok, corpus, window_len, n_calib, seed)
  eval         LongTensor [n_eval, window_len]   data.eval_windows(tok, corpus, window_len, n_eval)
  location     the plain checkpoint directory of the model (float32 transformers checkpoint)
  meta         the arguments above, so run.py can record them
The defaults are slimlm's defaults: CalibrationOptions (brown, 32 x 256 tokens, seed 0) and the
evaluation protocol (16 windows x 256 tokens).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output .pt file")
    p.add_argument("--model", default="smollm2-135m", help="model spec as slimlm takes it (default: smollm2-135m)")
    p.add_argument("--corpus", default="brown")
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="4 calibration and 2 evaluation windows (debugging)")
    a = p.parse_args(argv)
    if a.quick:
        a.calib_windows, a.eval_windows = 4, 2

    import torch

    from core import data, models

    src = models.resolve(a.model)
    tok = models.load_tokenizer(src)
    calib = data.calibration_windows(tok, a.corpus, a.window_len, a.calib_windows, a.seed)
    evalw = data.eval_windows(tok, a.corpus, a.window_len, a.eval_windows)
    payload = {
        "calibration": calib,
        "eval": evalw,
        "location": src.location,
        "meta": {
            "model": a.model,
            "corpus": a.corpus,
            "window_len": a.window_len,
            "calib_windows": int(calib.shape[0]),
            "eval_windows": int(evalw.shape[0]),
            "seed": a.seed,
            "source_note": src.note,
        },
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    print(f"wrote {out}: calibration {tuple(calib.shape)}, eval {tuple(evalw.shape)}, model {src.location}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
