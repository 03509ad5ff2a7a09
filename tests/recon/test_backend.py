import numpy as np
import pytest

from qsmprep.recon import _backend


def test_fft_workers_setting():
    x = np.random.default_rng(0).normal(size=(8, 10, 6)).astype(np.float32)
    ref = _backend.rfftn(x)
    assert _backend.get_fft_workers() == -1
    with _backend.fft_workers(1):
        assert _backend.get_fft_workers() == 1
        np.testing.assert_array_equal(_backend.rfftn(x), ref)
    assert _backend.get_fft_workers() == -1
    assert _backend.set_fft_workers(2) == -1
    assert _backend.set_fft_workers(None) == 2
    assert _backend.get_fft_workers() == -1
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers"):
            _backend.set_fft_workers(bad)
    assert _backend.get_fft_workers() == -1
