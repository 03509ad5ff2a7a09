"""Networks say when a scan's voxels are outside those they were trained on.

The conventional networks were trained on cubic voxels of 1-2 mm, the adaptive one on
0.5-2.5 mm in plane and 0.5-3.5 mm through plane (their checkpoints' ``data`` records); a 3 mm
or a 1 x 1 x 2.5 mm scan is new to a conventional network, and the map's sidecar and the log
say so.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("torch")

from qsmprep.dl.invert import dl_invert, training_voxel_range  # noqa: E402


@pytest.fixture(scope="module")
def field():
    f = np.zeros((24, 24, 24), np.float32)
    f[8:16, 8:16, 8:16] = 0.01
    return f, np.ones(f.shape, bool)


@pytest.mark.parametrize(
    "method, voxel_size, inside",
    [("dsbn", (1.5, 1.5, 1.5), True), ("dsbn", (3.0, 3.0, 3.0), False),
     ("unet", (1.0, 1.0, 2.5), False), ("dcfinetune", (2.2, 2.2, 2.2), True),
     ("adaptive", (1.0, 1.0, 2.5), True), ("adaptive", (3.0, 3.0, 3.0), False)],
)  # fmt: skip
def test_voxel_size_outside_training_is_flagged(field, caplog, method, voxel_size, inside):
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        _, info = dl_invert(method, *field, voxel_size, device="cpu")
    assert info["VoxelSizeInTrainingRange"] is inside
    warned = [r for r in caplog.records if "outside" in r.getMessage()]
    assert bool(warned) is not inside
    if warned:
        assert method in warned[0].getMessage() and "mm" in warned[0].getMessage()


def test_training_range_from_the_data_record():
    meta = {"data": {"synthetic": {"voxel_size": [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]},
                     "target": {"voxel_sizes": [(2.0, 2.0, 3.0)]}}}  # fmt: skip
    assert training_voxel_range(meta) == [(1.0, 2.0), (1.0, 2.0), (1.0, 3.0)]
    assert training_voxel_range({"data": {"synthetic": {"voxel_size": 1.0}}}) == [(1.0, 1.0)] * 3
    assert training_voxel_range({}) is None
