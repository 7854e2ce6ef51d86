"""The cache of the C++ CPU kernel's gradient buffers (csrc/cpu/grad_cache.cpp).

A freed gradient buffer of at least 1 MiB is handed to the next call of the same size, up
to a byte limit.  Covered: reuse through the public op; every element of a reused (stale)
buffer is written, for every kind of row; a buffer in use is never handed out twice;
the limit (0 turns the cache off) and emptying; small buffers bypass it; buffers freed on
other threads; resizing a gradient; TEMPSOFT_CPU_CACHE_MB, bad values included, in a
fresh process.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import tempsoft
from tempsoft import _dispatch
from tempsoft.cpu_cache import ENV, limit_from_env

pytestmark = pytest.mark.skipif(not _dispatch.backends()["cpu"][0],
                                reason="no C++ CPU kernels")

MIB = 1 << 20
# (rows, classes) of an fp32 gradient of 2 MiB: above the cache's 1 MiB floor.
BIG = (512, 1024)


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts from an empty cache with the default limit, and leaves it so.

    Garbage from earlier tests is collected first, and the cyclic collector is off during
    the test: a stray gradient freed mid-test would land in the cache and change its counts.
    """
    tempsoft.cross_entropy(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))  # load kernels
    limit = tempsoft.cpu_cache_info()["limit_bytes"]
    gc.collect()
    gc.disable()
    tempsoft.empty_cpu_cache()
    try:
        yield
    finally:
        gc.enable()
        tempsoft.set_cpu_cache_limit(limit)
        tempsoft.empty_cpu_cache()


def grad_of(x, y, T=0.5, **kw):
    x = x.detach().requires_grad_()
    tempsoft.cross_entropy(x, y, T, backend="cpu", **kw).backward()
    return x.grad


def reference_grad(x, y, T=0.5, **kw):
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64 / T, y, **kw).backward()
    return x64.grad


def case(seed, shape=BIG):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3
    y = torch.randint(0, shape[1], (shape[0],), generator=g)
    return x, y


def test_a_freed_gradient_buffer_is_reused_by_the_next_call():
    x, y = case(0)
    first = grad_of(x, y)
    ptr = first.data_ptr()
    del first
    info = tempsoft.cpu_cache_info()
    assert info["blocks"] == 1 and info["cached_bytes"] == BIG[0] * BIG[1] * 4
    second = grad_of(x, y)
    assert second.data_ptr() == ptr
    after = tempsoft.cpu_cache_info()
    assert after["hits"] == info["hits"] + 1 and after["cached_bytes"] == 0


@pytest.mark.parametrize("kind", ["index", "ignored", "smoothing_weight", "prob", "wide"])
def test_every_element_of_a_reused_buffer_is_written(kind):
    # The first call leaves large finite values in the buffer; the second, on other inputs,
    # must overwrite all of them (ignored rows included: those are written as zeros).
    shape = (96, 3000) if kind == "wide" else BIG
    x0, y0 = case(1, shape)
    stale = grad_of(x0 * 100, y0)
    ptr = stale.data_ptr()
    del stale
    x, y = case(2, shape)
    kw = {}
    if kind == "ignored":
        y[::3] = -100
    elif kind == "smoothing_weight":
        kw = dict(label_smoothing=0.1, weight=torch.rand(shape[1]) + 0.5)
    elif kind == "prob":
        y = torch.softmax(torch.randn(*shape), 1)
    grad = grad_of(x, y, **kw)
    assert grad.data_ptr() == ptr  # the stale buffer, reused
    ref = reference_grad(x, y.double() if kind == "prob" else y,
                         **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
    if kind == "ignored":
        assert (grad[::3] == 0).all()


def test_a_buffer_in_use_is_not_handed_out_again():
    x, y = case(3)
    held = grad_of(x, y)
    expected = held.clone()
    other = grad_of(-x, y)
    assert other.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, expected, rtol=0, atol=0)


def test_limit_zero_keeps_nothing_and_emptying_frees_everything():
    x, y = case(4)
    tempsoft.set_cpu_cache_limit(0)
    del_me = grad_of(x, y)
    del del_me
    assert tempsoft.cpu_cache_info()["cached_bytes"] == 0
    tempsoft.set_cpu_cache_limit(64 * MIB)
    grads = [grad_of(x, y) for _ in range(3)]  # three buffers in use at once
    del grads
    info = tempsoft.cpu_cache_info()
    assert info["blocks"] == 3 and info["cached_bytes"] == 3 * BIG[0] * BIG[1] * 4
    tempsoft.empty_cpu_cache()
    assert tempsoft.cpu_cache_info()["cached_bytes"] == 0
    assert tempsoft.cpu_cache_info()["limit_bytes"] == 64 * MIB


def test_the_limit_evicts_the_least_recently_freed_buffers():
    nbytes = BIG[0] * BIG[1] * 4
    tempsoft.set_cpu_cache_limit(2 * nbytes)
    x, y = case(5)
    grads = [grad_of(x, y) for _ in range(3)]
    ptrs = [g.data_ptr() for g in grads]
    for i in range(3):  # freed in order 0, 1, 2: buffer 0 is the one that no longer fits
        grads[i] = None
    assert tempsoft.cpu_cache_info()["blocks"] == 2
    again = [grad_of(x, y) for _ in range(2)]
    assert {g.data_ptr() for g in again} == set(ptrs[1:])
    with pytest.raises(ValueError, match="nbytes"):
        tempsoft.set_cpu_cache_limit(-1)


def test_small_gradients_bypass_the_cache():
    x, y = case(6, (16, 10))
    before = tempsoft.cpu_cache_info()
    grad_of(x, y)
    after = tempsoft.cpu_cache_info()
    assert (after["hits"], after["misses"], after["cached_bytes"]) == (
        before["hits"], before["misses"], 0)


def test_buffers_freed_on_other_threads_return_to_the_cache():
    x, y = case(7)
    grads = [grad_of(x, y) for _ in range(8)]
    threads = [threading.Thread(target=grads.pop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not grads
    info = tempsoft.cpu_cache_info()
    assert info["blocks"] == 8 and info["cached_bytes"] == 8 * BIG[0] * BIG[1] * 4


def test_a_cached_gradient_can_be_resized_like_any_tensor():
    x, y = case(8)
    grad = grad_of(x, y)
    expected = grad.clone()
    grad.resize_(BIG[0] * 2, BIG[1])  # grows through the cache's allocator
    torch.testing.assert_close(grad[:BIG[0]], expected, rtol=0, atol=0)
    grad.add_(1)  # and stays an ordinary tensor
    assert grad.is_contiguous() and grad.shape == (BIG[0] * 2, BIG[1])


@pytest.mark.parametrize("text,expected", [("", None), ("0", 0), ("1.5", 3 * MIB // 2),
                                           (" 256 ", 256 * MIB)])
def test_the_limit_from_the_environment(text, expected):
    assert limit_from_env({ENV: text}) == expected


@pytest.mark.parametrize("text", ["-1", "lots", "nan", "inf"])
def test_a_bad_limit_in_the_environment_is_a_clear_error(text):
    with pytest.raises(ValueError, match=ENV):
        limit_from_env({ENV: text})


def test_the_environment_sets_the_limit_in_a_fresh_process():
    code = ("import torch, tempsoft; "
            "tempsoft.cross_entropy(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)); "
            "print(tempsoft.cpu_cache_info()['limit_bytes'])")
    env = dict(os.environ, **{ENV: "3"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert int(out.stdout.strip()) == 3 * MIB


def test_a_cached_buffer_serves_a_request_up_to_half_its_size():
    tempsoft.set_cpu_cache_limit(64 * MIB)
    x4, y4 = case(9, (1024, 1024))  # 4 MiB
    x3, y3 = case(10, (768, 1024))  # 3 MiB
    big, mid = grad_of(x4, y4), grad_of(x3, y3)
    big_ptr, mid_ptr = big.data_ptr(), mid.data_ptr()
    del big, mid
    # 2.5 MiB: both blocks hold it; the smaller one is taken.
    x25, y25 = case(11, (640, 1024))
    g25 = grad_of(x25, y25)
    assert g25.data_ptr() == mid_ptr
    torch.testing.assert_close(g25.double(), reference_grad(x25, y25), rtol=1e-5,
                               atol=1e-5 * g25.abs().max().item())
    # 1.5 MiB: the 4 MiB block would waste more than half of itself, so it stays cached.
    x15, y15 = case(12, (384, 1024))
    g15 = grad_of(x15, y15)
    assert g15.data_ptr() != big_ptr
    assert tempsoft.cpu_cache_info()["cached_bytes"] == 4 * MIB
    del g25  # a 3 MiB block returns, and a 3 MiB request gets it back
    assert grad_of(x3, y3).data_ptr() == mid_ptr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
# Python >= 3.12 warns that forking a multi-threaded process may deadlock the child: that
# deadlock, on the cache's lock, is what this test looks for.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_takes_and_returns_buffers():
    # The cache's lock is held across fork(), never left locked in the child.
    x, y = case(13)
    del_me = grad_of(x, y)
    del del_me
    pid = os.fork()
    if pid == 0:  # the child: no OpenMP team here, one thread
        ok = False
        try:
            torch.set_num_threads(1)
            first = grad_of(x, y)
            ptr = first.data_ptr()
            del first
            ok = grad_of(x, y).data_ptr() == ptr
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
