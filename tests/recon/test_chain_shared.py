"""Field-chain targets on the development data (``../shared/data``; skipped where absent).

The App runs as a user runs it (``qsmprep.benchmarks.chain``, TKD, TV and MEDI) on qsmdev
(sub-01 axial, sub-02 tilted) and qsmdev-aniso (1 x 1 x 2.5 mm, tilted), scored over the true
brain mask. The bounds are the targets of the field-chain work, written before measuring; the
ones not reached yet are strict xfails with the measured values.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    if not (SHARED / "qsmdev").is_dir() or not (SHARED / "qsmdev-aniso").is_dir():
        pytest.skip("../shared/data is not available")
    from qsmprep.benchmarks.chain import run_chain

    out = tmp_path_factory.mktemp("chain_shared")
    results = run_chain(
        [SHARED / "qsmdev", SHARED / "qsmdev-aniso"], out, methods=("tkd", "tv", "medi"),
        log=lambda *_: None,
    )  # fmt: skip
    return {(s.dataset, s.acquisition): s for s in results}


def test_whole_brain_kept_and_covered(scores):
    # measured: kept 97.9-98.0 % (qsmdev), 97.1 % (aniso); TV and MEDI cover 99.3-99.9 %;
    # Dice 0.987-0.989
    assert len(scores) == 3
    for s in scores.values():
        assert s.dice >= 0.97, (s.acquisition, s.dice)
        assert s.kept >= 0.97, (s.acquisition, s.kept)
        for method in ("tv", "medi"):
            assert s.methods[method]["covered"] >= 0.99, (s.acquisition, method)


@pytest.mark.xfail(
    strict=True,
    reason="best method (TV) end to end: 51.4 / 59.5 % on qsmdev sub-01 / sub-02 and 53.1 % on"
    " qsmdev-aniso; targets 40 % and 45 %",
)
def test_best_method_end_to_end(scores):
    for (ds, acq), s in scores.items():
        best = min(row["end_to_end"]["nrmse"] for row in s.methods.values())
        assert best <= (45.0 if ds == "qsmdev-aniso" else 40.0), (ds, acq, best)


@pytest.mark.xfail(
    strict=True,
    reason="chain penalty (end to end / noise-matched oracle NRMSE): TV 1.88 / 2.05 / 2.30, MEDI"
    " 1.48 / 1.48 / 1.91 (qsmdev sub-01, sub-02, aniso); target 1.3",
)
def test_chain_penalty_of_tv_and_medi(scores):
    for (_, acq), s in scores.items():
        for method in ("tv", "medi"):
            assert s.methods[method]["chain_penalty"] <= 1.3, (acq, method)


@pytest.mark.xfail(
    strict=True,
    reason="local field slope 0.899 / 0.875 / 0.907 and NRMSE 52.6 / 54.1 / 58.7 % against 1.15"
    " x the noise-matched field's 35.0 / 37.6 / 30.2 % (qsmdev sub-01, sub-02, aniso)",
)
def test_local_field_against_the_truth(scores):
    for (_, acq), s in scores.items():
        assert 0.95 <= s.local_slope <= 1.05, (acq, s.local_slope)
        assert s.local_nrmse <= 1.15 * s.oracle_field_nrmse, (acq, s.local_nrmse)
