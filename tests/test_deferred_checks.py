"""TEMPSOFT_DEFERRED_CHECKS=1, the sync-free mode of the GPU backends, checked on the CPU
through the Triton interpreter (the CUDA backend's own tests are in tests/test_gpu.py).

In this mode a call makes no host read of device data: a bad target is never used as an
index (its row's loss is NaN and tempsoft.check_errors() raises it), a Python-number T is
checked on the host for free, and the gradient is written in the backward pass with
grad_output folded into its scale instead of comparing grad_output with 1 on the host.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tempsoft

pytestmark = [
    pytest.mark.skipif(not tempsoft.backends()["triton"],
                       reason=f"Triton unavailable: {tempsoft.backends()['triton']!r}"),
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="CPU tensors through the interpreter; with a GPU, tests/test_gpu.py "
                              "runs these checks on CUDA tensors"),
    # The interpreter evaluates both sides of every tl.where, so masked lanes warn about
    # log(0) and 0 * inf in numpy; the results are selected away.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setenv("TEMPSOFT_DEFERRED_CHECKS", "1")
    yield
    try:
        tempsoft.check_errors()
    except IndexError:
        pass  # a record the test left on purpose


def _case(seed=21):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(5, 7, generator=g) * 2).requires_grad_()
    w = torch.rand(7, generator=g) + 0.5
    return x, w


@pytest.mark.parametrize("bad", [-3, 7, 1000])
def test_bad_target_with_weight_and_mean_is_never_used_as_an_index(deferred, bad):
    """weight[target] for the mean's denominator must not see the bad target: no wrap-around
    for a negative one, no read past the weights for a large one. Its row's loss is NaN
    (so is the mean); the other rows get the gradient of the mean over themselves."""
    x, w = _case()
    y = torch.tensor([1, bad, 4, 6, 2])
    loss = tempsoft.cross_entropy(x, y, 1.5, weight=w, backend="triton")
    assert torch.isnan(loss)
    loss.backward()
    good = [0, 2, 3, 4]
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref[good] / 1.5, y[good], weight=w).backward()
    torch.testing.assert_close(x.grad[good], x_ref.grad[good])
    assert torch.equal(x.grad[1], torch.zeros(7))
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds.*row 1"):
        tempsoft.check_errors()
    tempsoft.check_errors()  # raising cleared the record


def test_bad_target_row_loss_is_nan_and_the_others_are_exact(deferred):
    x, w = _case(22)
    y = torch.tensor([1, 3, -8, 6, 2])
    loss = tempsoft.cross_entropy(x.detach(), y, 0.7, weight=w, label_smoothing=0.1,
                                  reduction="none", backend="triton")
    good = [0, 1, 3, 4]
    assert torch.isnan(loss[2])
    torch.testing.assert_close(loss[good], F.cross_entropy(
        x.detach()[good] / 0.7, y[good], weight=w, label_smoothing=0.1, reduction="none"))
    with pytest.raises(IndexError, match="-8"):
        tempsoft.check_errors()


def _forbid_host_reads(monkeypatch):
    """Make every way Python reads a tensor's value on the host raise."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("host read of a tensor value")
    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("learn_t", [False, True], ids=["number_T", "tensor_T"])
def test_forward_and_backward_read_nothing_on_the_host(deferred, monkeypatch, reduction,
                                                       learn_t):
    """The CPU-side half of the GPU test that runs under set_sync_debug_mode("error"): with
    deferred checks, the op's Python code never reads a tensor's value (each such read is a
    device sync on a GPU). The same call in the default mode does read (it checks targets)."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(6, 9, generator=g, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=g)
    T = torch.tensor(1.3, requires_grad=True) if learn_t else 1.3
    g_out = torch.rand(6, generator=g) if reduction == "none" else torch.tensor(3.0)
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        loss = tempsoft.cross_entropy(x, y, T, reduction=reduction, label_smoothing=0.1,
                                      backend="triton")
        loss.backward(g_out)
    x_ref = x.detach().clone().requires_grad_()
    T_ref = T.detach().clone().requires_grad_() if learn_t else T
    F.cross_entropy(x_ref / T_ref, y, reduction=reduction, label_smoothing=0.1).backward(g_out)
    torch.testing.assert_close(x.grad, x_ref.grad)
    if learn_t:
        torch.testing.assert_close(T.grad, T_ref.grad)

    monkeypatch.delenv("TEMPSOFT_DEFERRED_CHECKS")
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        with pytest.raises(AssertionError, match="host read"):
            tempsoft.cross_entropy(x, y, T, reduction=reduction, backend="triton")
