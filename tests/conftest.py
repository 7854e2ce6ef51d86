"""Shared pytest setup for tempsoft.

pytest imports this file before any test module, so everything here that must precede the
tests' own imports (environment variables read at import time, Hypothesis profiles that
``@settings`` decorators inherit from when they are created) is done at module level.
Fixtures shared by several test files belong here too, below the setup.
"""
from __future__ import annotations

import os

import pytest
import torch


def _interpret_triton_without_cuda() -> None:
    """Run Triton kernels under the interpreter when there is no CUDA device.

    Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when tempsoft's kernel
    modules are imported, so this must run before any test module imports them.
    """
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def _register_hypothesis_profiles() -> None:
    """Register the "ci" profile and load the one named by $HYPOTHESIS_PROFILE, if set.

    "ci" draws fresh random examples on every run (a failure prints the blob that replays
    it) and has no deadline (interpreted Triton is slow and its timing noisy).  It keeps Hypothesis's default max_examples, and a test that passes
    ``@settings(max_examples=...)`` keeps its own count: explicit settings override the
    loaded profile only for the fields they name.
    """
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # not installed: the tests that use it fail on their own import
        return
    settings.register_profile(
        "ci",
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    profile = os.environ.get("HYPOTHESIS_PROFILE")
    if profile:
        settings.load_profile(profile)


_interpret_triton_without_cuda()
_register_hypothesis_profiles()


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (restored after): tiny models are as fast on one
    thread, and OpenMP threads that spin-wait for each other stall on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
