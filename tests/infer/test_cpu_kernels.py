"""lmforge's compiled CPU kernel (the int8 GEMV of csrc/decode_kernels.c): built on first use, exact int8 arithmetic on
every instruction-set path, the same result on any thread count, safe from several Python threads
and after fork, and a clean fallback to torch's int8 paths when it cannot be built."""

from __future__ import annotations

import os
import platform
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from lmforge.infer import cpu_kernels as CK
from lmforge.infer import quantize as Q

X86 = platform.machine() in ("x86_64", "AMD64")
HAVE_CC = CK._compiler() is not None
needs_cc = pytest.mark.skipif(not (X86 and HAVE_CC), reason="the kernel is built with a C compiler on x86-64")


def _reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in torch: x rounded to 8 bits with one symmetric scale, int32 sums."""
    amax = x.abs().max()
    xq = torch.round(x * (127.0 / amax)).to(torch.int64) if amax > 0 else torch.zeros_like(x, dtype=torch.int64)
    acc = xq @ w.to(torch.int64).T  # exact
    return acc.double() * (amax.double() / 127.0) * scale.double()


def _operands(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    x = torch.randn(1, k, generator=g)
    return x, w, scale, w.sum(dim=1, dtype=torch.int32)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The native build and the AVX2 and plain x86-64 builds of the same source (own cache dir)."""
    if not (X86 and HAVE_CC):
        pytest.skip("the kernel is built with a C compiler on x86-64")
    d = tmp_path_factory.mktemp("kernels")
    return {march: CK.load(CK.build(march, d)) for march in ("native", "haswell", "x86-64")}


@needs_cc
@pytest.mark.parametrize("march", ["native", "haswell"])
@pytest.mark.parametrize("n,k", [(96, 64), (5, 3), (770, 2051), (4, 128), (1030, 768)])
def test_kernel_matches_exact_int8_arithmetic(builds, march, n, k):
    lib = builds[march]
    if march == "native" and lib.lmf_isa() == 0:
        pytest.skip("this CPU has neither AVX2 nor AVX512-VNNI")
    assert builds["haswell"].lmf_isa() == 1 and builds["x86-64"].lmf_isa() == 0
    x, w, scale, wsum = _operands(n, k)
    ref = _reference(x, w, scale)
    for threads in (1, 2, 3):
        y = CK.int8_gemv(lib, x, w, scale, wsum, threads)
        assert y.shape == (1, n) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    if n * k >= 2 * 128 * 1024:  # big enough to split: the pool's worker threads took part
        assert lib.lmf_workers() >= 1
    # the split over threads never changes a row's arithmetic: bitwise equal
    assert torch.equal(CK.int8_gemv(lib, x, w, scale, wsum, 1), CK.int8_gemv(lib, x, w, scale, wsum, 2))
    zero = CK.int8_gemv(lib, torch.zeros(1, k), w, scale, wsum, 2)  # all-zero activation: no division by zero
    assert torch.equal(zero, torch.zeros(1, n))


@needs_cc
def test_kernel_is_close_to_the_dequantized_matmul_and_fbgemm():
    if CK.int8_gemv_lib() is None:
        pytest.skip(f"kernel not in use here: {CK.int8_gemv_status()}")
    x, w, scale, wsum = _operands(2048, 768, seed=3)
    exact = F.linear(x, w.float() * scale[:, None])
    y = CK.int8_gemv(CK.int8_gemv_lib(), x, w, scale, wsum, 2)
    assert ((y - exact).norm() / exact.norm()).item() < 0.01  # 8-bit activations


@needs_cc
def test_kernel_from_several_python_threads_at_once():
    lib = CK.int8_gemv_lib()
    if lib is None:
        pytest.skip(f"kernel not in use here: {CK.int8_gemv_status()}")
    cases = [_operands(600 + 37 * i, 512 + 64 * i, seed=i) for i in range(4)]  # >= 256 KB: 2 parts
    refs = [CK.int8_gemv(lib, *c, 1) for c in cases]
    bad = []

    def work(i):
        for _ in range(200):
            if not torch.equal(CK.int8_gemv(lib, *cases[i], 2), refs[i]):
                bad.append(i)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts) and not bad


@needs_cc
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_kernel_works_in_a_forked_child_after_the_parent_used_its_threads():
    lib = CK.int8_gemv_lib()
    if lib is None:
        pytest.skip(f"kernel not in use here: {CK.int8_gemv_status()}")
    ops = _operands(1024, 512)  # 512 KB of weights: split over 2 threads
    want = CK.int8_gemv(lib, *ops, 2)  # the parent's pool is running
    pid = os.fork()
    if pid == 0:  # the child calls only the kernel (torch's OpenMP ops may hang after a fork)
        ok = False
        try:
            ok = torch.equal(CK.int8_gemv(lib, *ops, 2), want)
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in the kernel")


def test_turned_off_or_unbuildable_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    CK.reset()
    try:
        assert CK.int8_gemv_lib() is None and "LMFORGE_CPU_KERNELS" in CK.int8_gemv_status()
        monkeypatch.delenv("LMFORGE_CPU_KERNELS")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path / "cache"))
        CK.reset()
        if X86:
            assert CK.int8_gemv_lib() is None and "could not run" in CK.int8_gemv_status()
            with pytest.raises(RuntimeError, match="could not run"):
                CK.build()
        # an int8 layer still decodes one row (fbgemm where torch has it, else the weight-only paths)
        torch.manual_seed(0)
        q = Q.Int8Linear.from_linear(torch.nn.Linear(64, 48, bias=False))
        x = torch.randn(1, 64)
        with torch.no_grad():
            y = q(x)
        exact = F.linear(x, q.dequantize())
        assert ((y - exact).norm() / exact.norm()).item() < 0.02
    finally:
        CK.reset()


@needs_cc
def test_build_is_cached_by_source_flags_and_cpu(tmp_path):
    a = CK.build("native", tmp_path)
    mtime = a.stat().st_mtime_ns
    assert CK.build("native", tmp_path) == a and a.stat().st_mtime_ns == mtime  # reused, not rebuilt
    b = CK.build("haswell", tmp_path)
    assert b != a and not list(tmp_path.glob("*.tmp"))


def test_kernel_threads_are_per_python_thread():
    assert CK.kernel_threads() == 1
    seen = []
    with CK.use_threads(3):
        t = threading.Thread(target=lambda: seen.append(CK.kernel_threads()))
        t.start()
        t.join()
        assert CK.kernel_threads() == 3
    assert seen == [1] and CK.kernel_threads() == 1
