"""The CPU op's common case, served whole by one C++ call with a C++ autograd node
(csrc/cpu/autograd.cpp, chosen by tempsoft.ops.cross_entropy._cpu_common_case).

It must be the general path's twin: the same loss and gradient bit for bit, the same
autograd behaviour (retained graphs, grad_output scaling, hooks, the refusal of double
backward), and every call it does not fully check must go to the general path, which owns
the error messages.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tempsoft
from tempsoft import _dispatch
from tempsoft.ops import cross_entropy as ce_mod

pytestmark = pytest.mark.skipif(
    not _dispatch.available("cpu")[0], reason="the C++ CPU kernels are not built")

CPP_NODE = "CrossEntropyCpu"


def _is_cpp_node(loss) -> bool:
    return loss.grad_fn is not None and CPP_NODE in loss.grad_fn.name()


@pytest.fixture(params=["common", "general"])
def path(request, monkeypatch):
    """Run a test through the C++ common case, and again with it turned off."""
    if request.param == "general":
        monkeypatch.setattr(ce_mod, "_cpu_common_case", lambda *args: False)
    return request.param


def _case(dtype, seed=0, n=37, c=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=dtype) * 3
    y = torch.randint(0, c, (n,), generator=g)
    y[::5] = -100
    w = torch.rand(c, generator=g, dtype=dtype) + 0.1
    return x, y, w


def _loss_and_grad(x, y, T, g_out=None, **kw):
    x = x.clone().requires_grad_()
    loss = tempsoft.cross_entropy(x, y, T, **kw)
    loss.backward(g_out)
    return loss.detach(), x.grad, loss


# --------------------------------------------------------------------------------------
# Which calls take it
# --------------------------------------------------------------------------------------
def test_the_common_case_takes_the_cpp_node():
    x, y, w = _case(torch.float32)
    x.requires_grad_()
    assert _is_cpp_node(tempsoft.cross_entropy(x, y, 2.0))
    assert _is_cpp_node(tempsoft.cross_entropy(x, y, 3, weight=w, reduction="none",
                                               label_smoothing=0.1, ignore_index=-100,
                                               backend="cpu"))
    assert _is_cpp_node(tempsoft.nn.TemperatureCrossEntropyLoss(T=2.0)(x, y))
    assert _is_cpp_node(tempsoft.cross_entropy(torch.nn.Parameter(x.detach()), y, 2.0))


def _subclass(t):
    class Sub(torch.Tensor):
        pass

    return t.as_subclass(Sub)


GENERAL = {
    "T a tensor": lambda x, y, w: dict(T=torch.tensor(2.0)),
    "fp16 logits": lambda x, y, w: dict(x=x.half()),
    "spatial logits": lambda x, y, w: dict(x=x.reshape(37, 11, 1), y=y.reshape(37, 1)),
    "1-d logits": lambda x, y, w: dict(x=x[0], y=y[1]),
    "int32 targets": lambda x, y, w: dict(y=y.int()),
    "probability targets": lambda x, y, w: dict(y=torch.softmax(x.detach(), 1)),
    "in-place backward": lambda x, y, w: dict(inplace_backward=True),
    "reference backend": lambda x, y, w: dict(backend="torch"),
    "weight of another dtype": lambda x, y, w: dict(weight=w.double(), expect_error=True),
    "non-contiguous weight": lambda x, y, w: dict(weight=torch.stack([w, w], 1)[:, 0]),
    "tensor subclass": lambda x, y, w: dict(x=_subclass(x)),
    "bool T": lambda x, y, w: dict(T=True, expect_error=True),
    "T too small for 1/T": lambda x, y, w: dict(T=1e-300, expect_error=True),
    "label smoothing above 1": lambda x, y, w: dict(label_smoothing=1.5, expect_error=True),
    "unknown reduction": lambda x, y, w: dict(reduction="avg", expect_error=True),
    "float ignore_index": lambda x, y, w: dict(ignore_index=-100.0, expect_error=True),
    "targets of another length": lambda x, y, w: dict(y=y[:-1], expect_error=True),
}


@pytest.mark.parametrize("why", list(GENERAL))
def test_every_other_call_takes_the_general_path(why, monkeypatch):
    x, y, w = _case(torch.float32)
    args = dict(x=x.requires_grad_(), y=y, T=2.0, weight=None, ignore_index=-100,
                reduction="mean", label_smoothing=0.0, backend="auto", inplace_backward=False)
    change = GENERAL[why](x, y, w)
    expect_error = change.pop("expect_error", False)
    args.update(change)
    assert not ce_mod._cpu_common_case(*args.values())
    calls = []
    general = ce_mod._check_reduction
    monkeypatch.setattr(ce_mod, "_check_reduction",
                        lambda r: calls.append(r) or general(r))
    x_, y_, T_ = args.pop("x"), args.pop("y"), args.pop("T")
    if args["inplace_backward"]:
        x_ = x_.detach().clone().requires_grad_().clone()
    try:
        loss = tempsoft.cross_entropy(x_, y_, T_, **args)
    except (TypeError, ValueError, RuntimeError, IndexError):
        assert expect_error, why
    else:
        assert not expect_error, why
        assert not _is_cpp_node(loss)
    assert calls, f"{why}: the general path did not run"


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_jit_trace_is_refused_not_silently_constant(backend):
    """A trace records neither a kernel called through its module nor the checks' host
    reads: it used to replay the traced input's loss for every later input."""
    x, y, _ = _case(torch.float32)
    with pytest.raises(RuntimeError, match="cannot be traced with torch.jit.trace"):
        torch.jit.trace(lambda x: tempsoft.cross_entropy(x, y, 2.0, backend=backend), x)


def test_the_backend_named_by_the_environment_is_honoured(monkeypatch):
    x, y, _ = _case(torch.float32)
    monkeypatch.setenv("TEMPSOFT_BACKEND", "torch")
    assert not ce_mod._cpu_common_case(x, y, 2.0, None, -100, "mean", 0.0, "auto", False)


@pytest.mark.parametrize("env", [None, "auto", "cpu", " cpu ", "torch", " ", "nope"])
@pytest.mark.parametrize("backend", ["auto", "cpu", "torch", "triton", "cuda", "bogus"])
def test_runs_cpu_kernels_agrees_with_resolve(env, backend, monkeypatch):
    if env is None:
        monkeypatch.delenv("TEMPSOFT_BACKEND", raising=False)
    else:
        monkeypatch.setenv("TEMPSOFT_BACKEND", env)
    try:
        want = _dispatch.resolve(backend, torch.device("cpu")) == "cpu"
    except (ValueError, RuntimeError):
        want = False
    assert _dispatch.runs_cpu_kernels(backend) == want


def test_without_the_kernels_the_general_path_falls_back(monkeypatch):
    monkeypatch.setattr(_dispatch, "_native", lambda: (None, "not built (test)"))
    monkeypatch.setattr(_dispatch, "_warned_fallback", True)
    assert not _dispatch.runs_cpu_kernels("auto")
    x, y, _ = _case(torch.float64)
    loss = tempsoft.cross_entropy(x.requires_grad_(), y, 2.0)
    assert not _is_cpp_node(loss)
    torch.testing.assert_close(loss, F.cross_entropy(x / 2.0, y))


# --------------------------------------------------------------------------------------
# Twin of the general path
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("g_out", ["one", "scale"])
def test_equals_the_general_path_bit_for_bit(dtype, reduction, weighted, smoothing, g_out,
                                             monkeypatch):
    x, y, w = _case(dtype, seed=3)
    kw = dict(weight=w if weighted else None, reduction=reduction, label_smoothing=smoothing)
    if g_out == "one":
        grad_output = None if reduction != "none" else torch.ones(x.shape[0], dtype=dtype)
    else:  # a loss scale, or a per-row upstream gradient
        grad_output = (torch.tensor(1024.0, dtype=dtype) if reduction != "none"
                       else torch.rand(x.shape[0], dtype=dtype))
    loss, grad, node = _loss_and_grad(x, y, 0.7, grad_output, **kw)
    assert _is_cpp_node(node)
    monkeypatch.setattr(ce_mod, "_cpu_common_case", lambda *args: False)
    want_loss, want_grad, general = _loss_and_grad(x, y, 0.7, grad_output, **kw)
    assert not _is_cpp_node(general)
    assert loss.dtype == want_loss.dtype and loss.shape == want_loss.shape
    assert torch.equal(loss, want_loss)
    assert torch.equal(grad, want_grad)
    # and both are the definition
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64 / 0.7, y, weight=None if not weighted else w.double(),
                          reduction=reduction, label_smoothing=smoothing)
    ref.backward(None if grad_output is None else grad_output.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(grad.double(), x64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("no_grad", ["no_grad", "inference_mode", "detached"])
def test_without_a_gradient_the_loss_alone(no_grad):
    x, y, _ = _case(torch.float32)
    want = F.cross_entropy(x.double() / 2.0, y)
    if no_grad == "no_grad":
        with torch.no_grad():
            loss = tempsoft.cross_entropy(x.requires_grad_(), y, 2.0)
    elif no_grad == "inference_mode":
        with torch.inference_mode():
            loss = tempsoft.cross_entropy(x, y, 2.0)
    else:
        loss = tempsoft.cross_entropy(x, y, 2.0)
    assert loss.grad_fn is None and not loss.requires_grad
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)


def test_non_contiguous_logits_get_their_gradient(path):
    x = torch.randn(11, 37, requires_grad=True)
    y = torch.randint(0, 11, (37,))
    tempsoft.cross_entropy(x.t(), y, 2.0).backward()
    x2 = x.detach().clone().requires_grad_()
    F.cross_entropy(x2.t() / 2.0, y).backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_retained_graph_gives_the_same_gradient_every_time(path):
    x, y, _ = _case(torch.float64)
    x.requires_grad_()
    loss = tempsoft.cross_entropy(x, y, 2.0)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0].clone()
    loss.backward(retain_graph=True)
    loss.backward(torch.tensor(2.0, dtype=torch.float64), retain_graph=True)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 4 * first, rtol=0, atol=1e-15)
    assert torch.equal(torch.autograd.grad(loss, x)[0], first)


def test_double_backward_is_refused(path):
    x, y, _ = _case(torch.float64)
    x.requires_grad_()
    loss = tempsoft.cross_entropy(x, y, 2.0)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_hooks_and_saved_tensor_hooks_see_the_gradient(path):
    x, y, _ = _case(torch.float32)
    x.requires_grad_()
    seen, packed = [], []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = tempsoft.cross_entropy(x * 1.0, y, 2.0)
    loss.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(grad_inputs[0]))
    loss.backward()
    assert packed, "the saved gradient did not pass through the saved-tensor hooks"
    assert len(seen) == 1 and torch.equal(seen[0], x.grad)


def test_a_gradient_that_flows_on_to_earlier_layers(path):
    lin = torch.nn.Linear(8, 5).double()
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 5, (16,))
    tempsoft.cross_entropy(lin(x), y, 3.0, label_smoothing=0.1).backward()
    got = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    F.cross_entropy(lin(x) / 3.0, y, label_smoothing=0.1).backward()
    for a, p in zip(got, lin.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [11, -1])
def test_a_bad_target_names_itself(path, bad):
    x, y, _ = _case(torch.float32)
    y[2] = bad
    with pytest.raises(IndexError, match=f"(?i)target {bad} .*out of bounds"):
        tempsoft.cross_entropy(x.requires_grad_(), y, 2.0)
