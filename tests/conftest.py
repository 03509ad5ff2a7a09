"""Shared fixtures: simulated head phantoms, their fields and a multi-echo GRE signal.

All fixtures are session-scoped (built once per test run) and must be treated as read-only:
copy an array before changing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qsmprep.sim import make_head_phantom, simulate_fields

ECHO_TIMES = (0.004, 0.008, 0.012, 0.016, 0.020)
"""Echo times (s) of the ``gre2mm`` fixture."""


@pytest.fixture(scope="session")
def phantom():
    """Small head phantom: (64, 64, 48) at 3 mm, seed 1 (builds in well under a second)."""
    return make_head_phantom((64, 64, 48), (3.0, 3.0, 3.0), seed=1)


@pytest.fixture(scope="session")
def phantom_fields(phantom):
    """Ground-truth fields of ``phantom`` (dict of total/local/background ppm and Hz)."""
    return simulate_fields(phantom)


@pytest.fixture(scope="session")
def phantom2mm():
    """Head phantom (96, 96, 80) at 2 mm, seed 0."""
    return make_head_phantom((96, 96, 80), (2.0, 2.0, 2.0), seed=0)


@pytest.fixture(scope="session")
def phantom2mm_fields(phantom2mm):
    """Ground-truth fields of ``phantom2mm``."""
    return simulate_fields(phantom2mm)


@pytest.fixture(scope="session")
def gre2mm(phantom2mm, phantom2mm_fields):
    """5-echo GRE (TE 4-20 ms, 3 T) of ``phantom2mm`` at SNR 100, seed 0."""
    from qsmprep.sim import simulate_gre

    return simulate_gre(
        phantom2mm, ECHO_TIMES, b0=3.0, snr=100.0, seed=0, fields=phantom2mm_fields
    )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The development data in ``../shared/data`` next to the repository (skips when absent)."""
    path = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"development data not found at {path}")
    return path


@pytest.fixture()
def one_torch_thread():
    """One torch thread for a test, restored afterwards (the deep-learning tests use it).

    Tiny volumes gain nothing from threads, and OpenMP threads spinning on a shared, busy CPU
    slow the whole run down several-fold.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
