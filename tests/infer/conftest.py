import pytest


@pytest.fixture
def int8_kernel():
    """lmforge's compiled int8 decode kernel, decided afresh for the test (skipped where it cannot
    be built: no C compiler, not x86-64, a CPU without AVX2); reset again afterwards."""
    from lmforge.infer import cpu_kernels as CK

    CK.reset()
    if CK.int8_gemv_lib() is None:
        pytest.skip(f"lmforge's int8 kernel is not available here: {CK.int8_gemv_status()}")
    yield CK
    CK.reset()
