"""``--dl-adapt`` on the development data (``../shared/data/qsmdev``; skipped where absent).

The App runs as a user runs it (``qsmprep.benchmarks.chain``: TKD, QSMInvNet+ and QSMInvNet)
without and with ``--dl-adapt`` at its defaults, scored over the true brain mask. Bounds
from issue 14, written before measuring: adaptation lowers QSMInvNet+'s NRMSE on every
acquisition; QSMInvNet+ with ``--dl-adapt`` beats TKD and QSMInvNet in NRMSE and HFEN (not
reached yet: a strict xfail with the measured values).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
METHODS = ("tkd", "dsbn", "dcfinetune")

pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    if not (SHARED / "qsmdev").is_dir():
        pytest.skip("../shared/data is not available")
    from qsmprep.benchmarks.chain import run_chain

    out = {}
    for adapt in (False, True):
        folder = tmp_path_factory.mktemp("adapt" if adapt else "shipped")
        results = run_chain([SHARED / "qsmdev"], folder, methods=METHODS, dl_adapt=adapt,
                            log=lambda *_: None)  # fmt: skip
        out[adapt] = {s.acquisition: s.methods for s in results}
    return out


def _e2e(scores, adapt, acq, method, key="nrmse"):
    return scores[adapt][acq][method]["end_to_end"][key]


def test_adaptation_lowers_qsminvnet_plus_error(scores):
    # measured: 78.8 -> 72.5 % (sub-01), 81.2 -> 75.8 % (sub-02)
    assert sorted(scores[True]) == ["sub-01", "sub-02"]
    for acq in scores[True]:
        assert _e2e(scores, True, acq, "dsbn") < _e2e(scores, False, acq, "dsbn"), acq


@pytest.mark.xfail(
    strict=True,
    reason="QSMInvNet+ with --dl-adapt: NRMSE 72.5 / 75.8 % against TKD 63.7 / 68.6 % and "
    "QSMInvNet (adapted) 73.0 / 75.0 %; HFEN 61.3 / 67.5 % against TKD 56.3 / 57.1 % (qsmdev "
    "sub-01 / sub-02)",
)
def test_adapted_qsminvnet_plus_beats_tkd_and_qsminvnet(scores):
    for acq in scores[True]:
        for key in ("nrmse", "hfen"):
            ours = _e2e(scores, True, acq, "dsbn", key)
            assert ours < _e2e(scores, True, acq, "tkd", key), (acq, key)
            assert ours < _e2e(scores, True, acq, "dcfinetune", key), (acq, key)
