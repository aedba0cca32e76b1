"""Programmatic dependent launch (PDL, sm_90+) for slimlm's Triton kernels.

A kernel launched with PDL may be scheduled before the kernel ahead of it in the stream has finished: its programs
become resident as the previous kernel's programs finish (or once they all say `launch_dependents`), so the
launch gap and the previous kernel's tail overlap. Every PDL kernel here waits (griddepcontrol.wait: the previous
kernel has finished and its writes are visible) before it reads or writes any tensor, so it is correct whatever
ran before it, weights included.

A kernel takes PDL: tl.constexpr, set from mode():
  0      off (CPU, Triton's interpreter, pre-Hopper GPUs, under torch.compile, or PDL = False)
  EARLY  wait first, then let the next kernel launch at once: for grids that fill the GPU (>= 2 programs per SM)
  LATE   wait first, let the next kernel launch after the main loop: small grids (the next kernel's programs
         would otherwise sit on the SMs waiting; on an H100 this made a 128-program GEMV 25 % slower)
Under torch.compile Dynamo traces the launchers and takes no launch attributes, so PDL is off there (Inductor's
own PDL switch, tried on the compiled decode step, changed tokens/s by -1..+1 %: not used).
Measured (benchmarks/RESULTS.md, session 8, H100): back-to-back layers in a CUDA graph get 3-10 % faster at M = 1;
the whole decode step, where few of these kernels follow one another, does not change (+-0.5 %).
Kernels import pdl_wait / pdl_launch_dependents by these names: Inductor copies a user kernel's jit helpers into
its generated code by the name the kernel calls them (a module attribute such as pdl.wait would not resolve).
"""
from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

PDL = True  # False: launch without PDL (A/B runs)
EARLY = 1
LATE = 2
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_sms: dict[int, int] = {}  # device index -> SM count, 0 where PDL is unsupported


def _probe(idx: int) -> None:
    """Launch one tiny kernel with PDL and check it ran: an old driver or CUDA may refuse the launch attribute,
    and a kernel that raised would send every call of its layer to the slow reference path."""
    flag = torch.zeros(1, dtype=torch.int32, device=f"cuda:{idx}")
    _probe_kernel[(1,)](flag, PDL=LATE, **launch(LATE))
    torch.cuda.synchronize(idx)
    if flag.item() != 1:
        raise RuntimeError("the probe kernel did not write its flag")


def _sm_count(idx: int) -> int:
    """SMs of cuda:idx where PDL works there (sm_90+, probed once), else 0."""
    if idx not in _sms:
        sms = 0
        if torch.cuda.get_device_capability(idx) >= (9, 0):
            try:
                _probe(idx)
                sms = torch.cuda.get_device_properties(idx).multi_processor_count
            except Exception as e:  # noqa: BLE001  (the driver's or Triton's error, whatever its type)
                log.warning("programmatic dependent launch unavailable on cuda:%d (%s); kernels launch without it",
                            idx, str(e)[:200])
        _sms[idx] = sms
    return _sms[idx]


def mode(device: torch.device, programs: int, early: bool = True) -> int:
    """The PDL constexpr for a kernel of `programs` programs on `device` (see the module docstring); early=False
    for kernels that only wait or trigger late. Off until the device has been probed outside a CUDA graph capture
    (the probe synchronizes)."""
    if not PDL or INTERPRET or device.type != "cuda" or torch.compiler.is_compiling():
        return 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sms and torch.cuda.is_current_stream_capturing():
        return 0
    sms = _sm_count(idx)
    if not sms:
        return 0
    return EARLY if early and programs >= 2 * sms else LATE


def launch(pdl: int) -> dict:
    """Launch keyword for a kernel run with constexpr PDL = pdl."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Before a PDL kernel's first load or store: the previous kernel has finished and its writes are visible."""
    if PDL != 0:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr, AT: tl.constexpr):
    """Let the next kernel launch, at point AT (EARLY: right after pdl_wait(); LATE: after the main loop)."""
    if PDL == AT:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _probe_kernel(flag_ptr, PDL: tl.constexpr):
    pdl_wait(PDL)
    tl.store(flag_ptr, 1)
