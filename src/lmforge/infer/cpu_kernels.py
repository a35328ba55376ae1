"""CPU kernels written here, compiled on the machine that runs them.

One C file, `csrc/decode_kernels.c`, for batch-1 decode:
- the int8 GEMV: the activation row quantized to 8 bits on the fly, int8 x int8 products summed in
  int32 with AVX512-VNNI (or AVX2), the rows split over `kernel_threads()` threads (set by the
  decode loop) by a small pthread pool;
- the whole model for one sequence, a decode step or a few tokens at once (`lmf_forward`, driven by
  `lmforge.infer.native_decode`):
  embedding row, every layer's norms, GEMVs (fp32 or that int8 GEMV), RoPE, cache write and
  attention, the output head, in one call on the same pool. torch's own int8 paths at one row
(fbgemm's `quantized::linear_dynamic`, `_weight_int8pack_mm`) read the weights at roughly half the
memory bandwidth on this project's machine and do not gain from a second thread at one row;
`benchmarks/bench_decode.py` prints what each path gives.

The C file is compiled on first use with the system C compiler (`$CC`, else `cc` / `gcc` /
`clang`), `-O3 -march=native`, into `~/.cache/lmforge/kernels/` (`$LMFORGE_KERNEL_CACHE`
overrides; the file name carries a hash of the source, the flags and the CPU, so a shared home
directory never hands one CPU's build to another), then loaded with `ctypes`; no torch headers,
so the build takes about a second. Where there is no compiler, the build fails, or the CPU has
neither AVX2 nor AVX512-VNNI, `int8_gemv_lib()` returns None and callers keep torch's paths.
`LMFORGE_CPU_KERNELS=0` turns the compiled kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_kernels.c"
FLAGS = ("-O3", "-shared", "-fPIC", "-pthread")
ISA_NAMES = {0: "none", 1: "AVX2", 2: "AVX512-VNNI"}

_LIB: ctypes.CDLL | bool | None = None  # None: not tried yet; False: unavailable
_WHY = ""
_READY: bool | None = None  # int8_gemv_lib() is not None, once decided (a plain bool: torch.compile reads it)
_LOCAL = threading.local()  # .threads: the kernel's thread count on this Python thread


def cache_dir() -> Path:
    env = os.environ.get("LMFORGE_KERNEL_CACHE", "").strip()
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "lmforge" / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC", "").strip()
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cpu_signature() -> bytes:
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return os.uname().machine.encode()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep)).encode()


def build(march: str = "native", out_dir: Path | None = None) -> Path:
    """Compile `SOURCE` for `march` (cached: an existing build of the same source, flags, compiler
    and CPU is reused). RuntimeError with the compiler's message when it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    flags = (*FLAGS, f"-march={march}")
    key = hashlib.sha256(SOURCE.read_bytes() + repr((cc, flags)).encode() + _cpu_signature()).hexdigest()[:16]
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    path = out_dir / f"decode_kernels-{march}-{key}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise RuntimeError(f"{cc} failed: {msg[0] if msg else 'exit ' + str(res.returncode)}")
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} could not run: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.lmf_int8_gemv.argtypes = [p, i, p, p, p, i, p, p, i]
    lib.lmf_int8_gemv.restype = i
    lib.lmf_isa.argtypes = []
    lib.lmf_isa.restype = i
    lib.lmf_workers.argtypes = []
    lib.lmf_workers.restype = i
    lib.lmf_forward.argtypes = [p, p, i, i, p, p, i, i, p]
    lib.lmf_forward.restype = i
    lib.lmf_forward_rows.argtypes = [p, p, i, p, p, ctypes.c_int64, p, p, i]
    lib.lmf_forward_rows.restype = i
    lib.lmf_f32_gemv.argtypes = [p, i, p, i, p, i]
    lib.lmf_f32_gemv.restype = i
    lib.lmf_int4_gemv.argtypes = [p, i, i, p, p, p, i, p, p, p]
    lib.lmf_int4_gemv.restype = i
    lib.lmf_work_floats.argtypes = [p]
    lib.lmf_work_floats.restype = ctypes.c_long
    lib.lmf_qwork_bytes.argtypes = [p]
    lib.lmf_qwork_bytes.restype = ctypes.c_long
    return lib


def _turned_off() -> bool:
    return os.environ.get("LMFORGE_CPU_KERNELS", "").strip().lower() in ("0", "off", "false", "no")


def int8_gemv_lib() -> ctypes.CDLL | None:
    """The compiled int8 GEMV library, built on first call; None where it cannot be used (see the
    module docstring; `int8_gemv_status()` says why)."""
    global _LIB, _WHY, _READY
    if _LIB is None:
        if _turned_off():
            _LIB, _WHY = False, "turned off by LMFORGE_CPU_KERNELS"
        elif os.uname().machine not in ("x86_64", "AMD64", "i686"):
            _LIB, _WHY = False, f"no kernel for {os.uname().machine}"
        else:
            try:
                lib = load(build())
                if lib.lmf_isa() == 0:
                    _LIB, _WHY = False, "the CPU has neither AVX2 nor AVX512-VNNI"
                else:
                    _LIB, _WHY = lib, ISA_NAMES[lib.lmf_isa()]
            except (OSError, RuntimeError) as e:
                _LIB, _WHY = False, str(e)
                logger.info("lmforge int8 decode kernel not available (%s); torch's int8 paths are used", e)
        _READY = bool(_LIB)
    return _LIB or None


def int8_gemv_ready() -> bool:
    """Whether `int8_gemv_lib()` gives a library (decided on the first call, then a cached bool)."""
    if _READY is None:
        int8_gemv_lib()
    return bool(_READY)


def int8_gemv_status() -> str:
    """"AVX512-VNNI" / "AVX2" when the kernel is in use, else why not."""
    int8_gemv_lib()
    return _WHY


def reset() -> None:
    """Forget the loaded library's state so the next call decides again (tests)."""
    global _LIB, _WHY, _READY
    _LIB, _WHY, _READY = None, "", None


def kernel_threads() -> int:
    """Threads the compiled kernels split a call over on this Python thread: 1 unless a caller set
    more with `use_threads` (the decode loop does, and then runs torch's own ops on one thread: the
    kernel's pool and torch's OpenMP pool spinning side by side on the same cores measured 2-3x
    slower than either alone)."""
    return getattr(_LOCAL, "threads", 1)


@contextlib.contextmanager
def use_threads(n: int) -> Iterator[None]:
    """Run the block with the compiled kernels on `n` threads (this Python thread only)."""
    before = kernel_threads()
    _LOCAL.threads = max(1, int(n))
    try:
        yield
    finally:
        _LOCAL.threads = before


def set_threads(n: int) -> None:
    """`use_threads` without the block (the decode loop's thread tuner switches counts step by step)."""
    _LOCAL.threads = max(1, int(n))


def int8_gemv(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, wsum: torch.Tensor,
              threads: int, lead: tuple = (1,)) -> torch.Tensor:
    """x (K values, fp32: (1, K) or any shape with K elements) -> (*lead, N) fp32, with weight (N, K)
    int8, scale (N,) fp32 and wsum (N,) int32 (the weight's row sums), all contiguous CPU tensors
    (the caller checks)."""
    N, K = weight.shape
    y = torch.empty(*lead, N)
    lib.lmf_int8_gemv(x.data_ptr(), K, weight.data_ptr(), scale.data_ptr(), wsum.data_ptr(), N, y.data_ptr(),
                      _scratch(K), threads)
    return y


def f32_gemv(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, threads: int) -> torch.Tensor:
    """x (K fp32 values) -> (1, N): the decode kernel's fp32 GEMV over a contiguous (N, K) fp32 weight."""
    N, K = weight.shape
    y = torch.empty(1, N)
    lib.lmf_f32_gemv(x.contiguous().data_ptr(), K, weight.data_ptr(), N, y.data_ptr(), threads)
    return y


def _scratch(size: int) -> int:
    """Address of this Python thread's scratch buffer of at least `size` bytes (the quantized
    activation row; read only during the call, so one per thread is reused)."""
    buf = getattr(_LOCAL, "scratch", None)
    if buf is None or len(buf) < size:
        buf = _LOCAL.scratch = ctypes.create_string_buffer(max(size, 8192))
        _LOCAL.scratch_at = ctypes.addressof(buf)
    return _LOCAL.scratch_at


__all__ = ["SOURCE", "build", "cache_dir", "f32_gemv", "int8_gemv", "int8_gemv_lib", "int8_gemv_ready", "int8_gemv_status", "kernel_threads", "load", "reset",
           "set_threads", "use_threads"]
