"""Run kernels/*.hip on the CPU (tests without a GPU): g++ + tests/gpu/emu/emu.h.

    mod = EmuModule("matvec")                       # builds a shared library once per file
    mod.launch("matvec_q4_0", grid, block, arena, 0, row_bytes, rows, cols, x, None, y)

Arguments follow the kernel's C signature: numpy arrays (or None) for pointers, Python numbers
for scalars. One std::thread per GPU thread, blocks one after another: keep launches small.
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from rocmforge_lab.backend import kernels as K

HERE = Path(__file__).resolve().parent
_BUILD = Path(tempfile.gettempdir()) / "rocmforge_lab_emu"
_SIG_RE = re.compile(r'extern\s+"C"\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{')


def available() -> bool:
    return shutil.which("g++") is not None


def _ctype(decl: str):
    t = decl.strip()
    if "*" in t:
        return ctypes.c_void_p
    base = t.rsplit(None, 1)[0] if len(t.split()) > 1 else t
    base = base.replace("const", "").strip()
    if base in ("rf_i64", "long long"):
        return ctypes.c_longlong
    if base in ("rf_u64", "unsigned long long"):
        return ctypes.c_ulonglong
    if base == "float":
        return ctypes.c_float
    if base == "double":
        return ctypes.c_double
    if base in ("int", "rf_i32"):
        return ctypes.c_int
    if base in ("unsigned", "unsigned int", "rf_u32"):
        return ctypes.c_uint
    raise TypeError(f"emu: unsupported parameter type {decl!r}")


class EmuModule:
    def __init__(self, name: str, warp_size: int = 32, defines: dict | None = None):
        self.name = name
        self.warp_size = warp_size
        src = K.load_source(name)
        header = (HERE / "emu.h").read_text()
        extra = "".join(f"#define {k} {v}\n" for k, v in (defines or {}).items())  # as -Dk=v would
        full = f"#define WARP_SIZE {warp_size}\n{extra}{header}\n{src}\n"
        _BUILD.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(full.encode()).hexdigest()[:16]
        base = _BUILD / f"{name}_{warp_size}_{tag}"
        cpp = base.with_suffix(".cpp")
        so = base.with_suffix(".so")
        cpp.write_text(full)
        pre = subprocess.run(["g++", "-std=c++20", "-E", "-P", str(cpp)], capture_output=True, text=True)
        if pre.returncode != 0:
            raise RuntimeError(f"emu: preprocessing {name} failed:\n{pre.stderr}")
        self.sigs: dict[str, list[tuple[str, str, object]]] = {}
        for m in _SIG_RE.finditer(pre.stdout):
            params = []
            for p in (p.strip() for p in m.group(2).split(",")):
                if not p:
                    continue
                nm = re.search(r"(\w+)\s*$", p)
                params.append((nm.group(1), p[: nm.start()].strip(), _ctype(p)))
            self.sigs[m.group(1)] = params
        launchers = []
        for kname, params in self.sigs.items():
            decl = ", ".join(self._cdecl(t) + f" a{i}" for i, (_, _, t) in enumerate(params))
            call = ", ".join(f"({ct})a{i}" for i, (_, ct, _) in enumerate(params))
            launchers.append(
                f'extern "C" void emu_{kname}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,'
                f" unsigned bz{', ' + decl if decl else ''}) {{\n"
                f"  emu_launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, [&] {{ {kname}({call}); }});\n}}\n"
            )
        cpp.write_text(full + "\n" + "".join(launchers))
        if not so.exists():
            r = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-o", str(so), str(cpp)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"emu: compiling {name} failed:\n{r.stderr[-6000:]}")
        self.lib = ctypes.CDLL(str(so))

    @staticmethod
    def _cdecl(t) -> str:
        return {ctypes.c_void_p: "void*", ctypes.c_longlong: "long long", ctypes.c_ulonglong: "unsigned long long",
                ctypes.c_float: "float", ctypes.c_double: "double", ctypes.c_int: "int", ctypes.c_uint: "unsigned"}[t]

    def launch(self, kernel: str, grid, block, *args):
        if kernel not in self.sigs:
            raise KeyError(f"emu: no kernel {kernel} in {self.name} (have {sorted(self.sigs)})")
        params = self.sigs[kernel]
        if len(args) != len(params):
            raise TypeError(f"emu: {kernel} takes {len(params)} arguments, got {len(args)}")
        grid = tuple(grid) + (1,) * (3 - len(tuple(grid)))
        block = tuple(block) + (1,) * (3 - len(tuple(block)))
        cargs = []
        for a, (pname, _, t) in zip(args, params):
            if t is ctypes.c_void_p:
                if a is None:
                    cargs.append(ctypes.c_void_p(0))
                else:
                    assert isinstance(a, np.ndarray) and a.flags.c_contiguous, f"{kernel}.{pname}: need a C-contiguous array"
                    cargs.append(ctypes.c_void_p(a.ctypes.data))
            else:
                cargs.append(t(a))
        fn = getattr(self.lib, f"emu_{kernel}")
        fn.restype = None
        fn(*[ctypes.c_uint(int(v)) for v in grid + block], *cargs)
