"""Find, compile and cache the HIP/CUDA kernels in `kernels/*.hip`.

The kernel sources live in the repository's `kernels/` folder (next to the `rocmforge_lab`
package). Each file is one kernel family written in the portable HIP/CUDA subset described
in `kernels/compat.h`. We compile them at run time with `cupy.RawModule` (nvrtc on CUDA
builds of CuPy, hiprtc on ROCm builds), with `-DWARP_SIZE=<device warp size>`.

Local `#include "x.h"` lines are pasted into the source here (each header once), so the
runtime compiler needs no include path and the compile log line numbers refer to one text.

    src = load_source("matvec")                 # str, includes resolved
    mod = get_module("matvec")                  # cupy.RawModule, compiled for the current device
    fn = get_function("matvec", "matvec_q4_k")  # cupy.RawKernel

Modules are cached per (device id, file, options). A compile error raises
`KernelCompileError` naming the file and carrying the compiler's log.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

# GGML type ids -> kernel name suffix (kernels/quant_blocks.h: RF_FOR_EACH_QTYPE)
QTYPE_SUFFIX = {
    "F32": "f32",
    "F16": "f16",
    "BF16": "bf16",
    "Q4_0": "q4_0",
    "Q4_1": "q4_1",
    "Q5_0": "q5_0",
    "Q5_1": "q5_1",
    "Q8_0": "q8_0",
    "Q2_K": "q2_k",
    "Q3_K": "q3_k",
    "Q4_K": "q4_k",
    "Q5_K": "q5_k",
    "Q6_K": "q6_k",
    "MXFP4": "mxfp4",
}

# head sizes with a fused prefill attention kernel (kernels/attention_prefill.hip)
PREFILL_HEAD_DIMS = (64, 80, 96, 112, 128, 256)

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


class KernelCompileError(RuntimeError):
    """A kernels/*.hip file failed to compile; the message holds the file and the compiler log."""

    def __init__(self, file: str, log: str, options: tuple[str, ...] = ()):
        self.file = file
        self.log = log
        self.options = options
        super().__init__(f"kernel file {file} failed to compile (options {' '.join(options)}):\n{log}")


def kernels_dir() -> Path:
    """The `kernels/` folder: $ROCMFORGE_LAB_KERNELS, else next to the package (repo root)."""
    env = os.environ.get("ROCMFORGE_LAB_KERNELS")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "kernels", here.parents[1] / "kernels"):
        if (cand / "compat.h").is_file():
            return cand
    return here.parents[2] / "kernels"


def kernel_files() -> list[Path]:
    """Every kernels/*.hip file, sorted."""
    return sorted(kernels_dir().glob("*.hip"))


def load_source(name: str) -> str:
    """Source text of kernels/<name>.hip with local includes pasted in (each header once)."""
    path = kernels_dir() / (name if name.endswith(".hip") else f"{name}.hip")
    if not path.is_file():
        raise FileNotFoundError(f"kernel file {path} not found (kernels dir: {kernels_dir()})")
    seen: set[str] = set()

    def expand(p: Path) -> str:
        text = p.read_text()

        def repl(m: re.Match) -> str:
            inc = m.group(1)
            if inc in seen:
                return f"// (already included: {inc})"
            seen.add(inc)
            ip = p.parent / inc
            if not ip.is_file():
                raise FileNotFoundError(f"{p}: included file {inc} not found")
            return f"// ---- begin {inc} ----\n{expand(ip)}\n// ---- end {inc} ----"

        return _INCLUDE_RE.sub(repl, text)

    return expand(path)


# ------------------------------------------------------------------------------------------
# Compilation (needs CuPy)

_cache: dict[tuple, object] = {}
_lock = threading.Lock()


_warp_sizes: dict[int, int] = {}
_functions: dict[tuple, object] = {}


def device_warp_size(device_id: int | None = None) -> int:
    """Warp size of a CuPy device (32 on NVIDIA and RDNA, 64 on CDNA); cached per device."""
    import cupy

    dev_id = cupy.cuda.runtime.getDevice() if device_id is None else int(device_id)
    ws = _warp_sizes.get(dev_id)
    if ws is None:
        try:
            ws = int(cupy.cuda.Device(dev_id).attributes["WarpSize"])
        except Exception:  # pragma: no cover - older CuPy
            ws = int(cupy.cuda.runtime.getDeviceProperties(dev_id)["warpSize"])
        _warp_sizes[dev_id] = ws
    return ws


def compile_options(device_id: int | None = None, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return (f"-DWARP_SIZE={device_warp_size(device_id)}",) + tuple(extra)


def get_module(name: str, extra_options: tuple[str, ...] = ()):
    """The compiled `cupy.RawModule` of kernels/<name>.hip for the current device (cached)."""
    import cupy

    dev = cupy.cuda.Device().id
    options = compile_options(dev, extra_options)
    key = (dev, name, options)
    mod = _cache.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _cache.get(key)
        if mod is not None:
            return mod
        src = load_source(name)
        file = str(kernels_dir() / f"{name}.hip")
        try:
            mod = cupy.RawModule(code=src, options=options, backend="nvrtc")
            if hasattr(mod, "compile"):
                mod.compile()
            else:  # pragma: no cover - very old CuPy compiles on first lookup
                mod.get_function(_first_kernel_name(src))
        except Exception as exc:  # cupy.cuda.compiler.CompileException and friends
            log = exc.get_message() if hasattr(exc, "get_message") else str(exc)
            raise KernelCompileError(file, log, options) from exc
        _cache[key] = mod
        return mod


def _first_kernel_name(src: str) -> str:
    m = re.search(r'RF_KERNEL\s+void\s+(\w+)', src)
    return m.group(1) if m else "__none__"


def get_function(module: str, kernel: str, extra_options: tuple[str, ...] = ()):
    """A `cupy.RawKernel` from kernels/<module>.hip (cached per device: ops call this per launch);
    `extra_options` (e.g. ``("-DFD_PF_L1=1",)``) selects a build of the module with those options."""
    import cupy

    extra_options = tuple(extra_options)
    key = (cupy.cuda.runtime.getDevice(), module, kernel, extra_options)
    fn = _functions.get(key)
    if fn is None:
        mod = get_module(module, extra_options)
        try:
            fn = mod.get_function(kernel)
        except Exception as exc:
            raise KeyError(f"kernel '{kernel}' not found in kernels/{module}.hip ({exc})") from exc
        _functions[key] = fn
    return fn


def clear_cache() -> None:
    """Forget compiled modules (they are rebuilt on next use; CuPy's disk cache still applies)."""
    with _lock:
        _cache.clear()
        _functions.clear()
