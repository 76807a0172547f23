"""Fused CPU kernels for the activation fake-quantizer, compiled on first use.

Block reconstruction on a CPU spends much of each iteration outside the convolutions, in the
LSQ/QDrop fake-quantizer's elementwise passes (about ten over every activation in the backward
alone). `csrc/fused_quant.cpp` does the forward and the backward in one pass each, threaded by
ATen's own pool; it is built with the machine's C++ compiler through `torch.utils.cpp_extension`
(~15 s, once per machine and torch version, cached under `~/.cache/dfq`). Where it cannot be built
(no compiler, no ninja) or `DFQ_FUSED=0` is set, `quant.modules` computes the same values with ATen
ops, only slower: results never depend on the kernel being there.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "fused_quant.cpp"
_state: dict[str, object] = {}


def _cpu_flags() -> tuple[str, list[str]]:
    """A name suffix and compiler flags for this CPU: AVX2+FMA code where the CPU has them.

    Not `-march=native`: a cache directory shared by unlike machines must not hand one machine
    code built for another's instruction set, so the instruction set is part of the build's name.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx2" in flags and "fma" in flags:
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


def _build_dir(suffix: str) -> Path:
    root = os.environ.get("DFQ_EXT_DIR") or Path.home() / ".cache" / "dfq" / "torch-ext"
    tag = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}-{suffix}"
    return Path(root) / tag


def enabled() -> bool:
    """Whether fused kernels are wanted (`DFQ_FUSED=0` switches them off, e.g. to compare)."""
    return os.environ.get("DFQ_FUSED", "1") not in ("0", "false", "no", "off")


def ops():
    """`torch.ops.dfq_fused` once built and loaded, else None (with one warning saying why)."""
    if not enabled():
        return None
    if "ops" in _state:
        return _state["ops"]
    _state["ops"] = None
    try:
        _state["ops"] = _load()
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back, say so once
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"dfq: fused CPU quantization kernels unavailable ({first}); using ATen ops", stacklevel=2
        )
    return _state["ops"]


def _load():
    if not hasattr(torch.ops, "dfq_fused") or not hasattr(torch.ops.dfq_fused, "lsq_forward"):
        log = logging.getLogger("torch.utils.cpp_extension")  # its import warns about CUDA on CPU hosts
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load
        finally:
            log.setLevel(level)

        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError("no C++ compiler on PATH")
        suffix, arch = _cpu_flags()
        build = _build_dir(suffix)
        build.mkdir(parents=True, exist_ok=True)
        name = f"dfq_fused_{suffix}"
        if not (build / f"{name}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}").exists():
            print(f"dfq: building fused CPU kernels in {build} (once, ~15 s)", file=sys.stderr)
        load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *arch],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
    return torch.ops.dfq_fused


def usable(*tensors: torch.Tensor | None) -> bool:
    """True when the kernels take these tensors: float32, CPU, dense, one shared memory layout."""
    first = None
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32 or not _dense(t):
            return False
        if first is None:
            first = t
        elif t.shape != first.shape or t.stride() != first.stride():
            return False
    return first is not None


def _dense(t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return True
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
