"""Muon's GPU path (lmforge.train.optim): Newton-Schulz in bf16 and each same-shaped group's update
as one compiled function. Run here on CPU: the bf16 path in bf16 on CPU, the compiled function
under CPU inductor; on CUDA also that an optimizer step makes no device->host sync."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.train import optim as O

SHAPES = [(32, 32), (32, 32), (32, 32), (88, 32), (88, 32), (32, 88), (16, 48)]


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]


def _run(opt, ps, steps, seed=1):
    """`steps` optimizer steps on fixed random gradients; returns the weights after each step."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


@pytest.mark.parametrize("shape", [(64, 64), (48, 128), (128, 48), (3, 96, 96)])
def test_bf16_newton_schulz_stays_close_to_fp32(shape):
    torch.manual_seed(sum(shape))
    g = torch.randn(*shape)
    lo, hi = O.newton_schulz(g, dtype=torch.bfloat16), O.newton_schulz(g)
    assert lo.dtype == g.dtype == hi.dtype
    rel = ((lo - hi).norm() / hi.norm()).item()
    assert rel < 0.06, rel  # bf16 rounding through five iterations (measured ~0.03)
    assert F.cosine_similarity(lo.flatten(), hi.flatten(), dim=0) > 0.998
    # still orthogonalised: the top singular values land in the same band around 1
    s_lo, s_hi = torch.linalg.svdvals(lo), torch.linalg.svdvals(hi)
    torch.testing.assert_close(s_lo.amax(-1), s_hi.amax(-1), rtol=0.05, atol=0)
    assert (s_lo.amax(-1) < 1.25).all()


def test_group_update_equals_the_cpu_kernels_in_fp32():
    """The plain iteration `_group_update` runs (the CUDA code) against the CPU kernels (baddbmm,
    Gram space for wide matrices) that eager fp32 Muon on CPU uses."""
    torch.manual_seed(3)
    for shape in [(32, 32), (88, 32), (32, 88)]:
        grads, bufs = [torch.randn(shape) for _ in range(3)], [torch.randn(shape) for _ in range(3)]
        got = O._group_update(grads, bufs, 0.95, True, 5, torch.float32)
        ref = O.newton_schulz(torch.stack([g + 0.95 * b for g, b in zip(grads, bufs)]), 5)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-3 * ref.abs().max().item())
        torch.testing.assert_close(O._group_update(grads, bufs, 0.95, False, 5, torch.float32),
                                   O.newton_schulz(torch.stack(bufs), 5), rtol=0, atol=2e-3 * ref.abs().max().item())


@pytest.mark.parametrize("nesterov,wd", [(True, 0.0), (False, 0.1)])
def test_muon_bf16_path_stays_close_to_fp32(nesterov, wd):
    ps, qs = _params(SHAPES), _params(SHAPES)
    lo = O.Muon(ps, lr=0.02, nesterov=nesterov, weight_decay=wd, ns_dtype=torch.bfloat16, compile=False)
    hi = O.Muon(qs, lr=0.02, nesterov=nesterov, weight_decay=wd)
    w0 = [q.detach().clone() for q in qs]
    for step_lo, step_hi in zip(_run(lo, ps, 3), _run(hi, qs, 3)):
        for a, b, w in zip(step_lo, step_hi, w0):
            moved = (b - w).norm()
            assert (a - b).norm() < 0.06 * moved  # the bf16 updates differ by rounding only
    for p, q in zip(ps, qs):  # momentum is fp32 arithmetic on the gradients in both paths
        assert torch.equal(lo.state[p]["momentum_buffer"], hi.state[q]["momentum_buffer"])


def test_defaults_pick_fp32_eager_on_cpu_and_bf16_on_cuda():
    opt = O.Muon(_params([(8, 8)]))
    assert opt._fast_path(torch.device("cpu")) == (False, torch.float32)
    assert opt._fast_path(torch.device("cuda")) == (O._has_triton(), torch.bfloat16)
    forced = O.Muon(_params([(8, 8)]), ns_dtype=torch.float32, compile=True)
    assert forced._fast_path(torch.device("cuda")) == (True, torch.float32)
    # the instance settings are not param-group keys: an optimizer.pt of an older run loads unchanged
    assert "ns_dtype" not in opt.param_groups[0] and "compile" not in opt.param_groups[0]


@pytest.mark.slow
def test_compiled_group_update_equals_eager_on_cpu():
    """torch.compile of the group update (CPU inductor here, Triton on GPU) against the same
    function run eagerly, then inside Muon against the CPU path; one shape group and the same
    constants throughout, so one compilation (~10 s on a small CPU)."""
    torch.manual_seed(5)
    grads, bufs = [torch.randn(24, 40) for _ in range(3)], [torch.randn(24, 40) for _ in range(3)]
    got = O._compiled_group_update()(grads, bufs, 0.95, True, 5, torch.float32)
    torch.testing.assert_close(got, O._group_update(grads, bufs, 0.95, True, 5, torch.float32), rtol=1e-5, atol=1e-6)
    shapes = [(24, 40)] * 3
    ps, qs = _params(shapes), _params(shapes)
    comp = O.Muon(ps, ns_dtype=torch.float32, compile=True)
    ref = O.Muon(qs)  # eager fp32 CPU kernels
    for a_step, b_step in zip(_run(comp, ps, 2), _run(ref, qs, 2)):
        for a, b in zip(a_step, b_step):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
def test_muon_step_makes_no_host_sync_on_cuda():
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in _params(SHAPES)]
    opt = O.Muon(ps, lr=0.02, weight_decay=0.1)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # first step: state allocation and compilation
    for p in ps:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in ps)
