"""Phase unwrapping: Laplacian (FFT Poisson), quality-guided (exact), multi-echo, offsets.

* :func:`unwrap_laplacian`: Poisson solution of the wrapped-phase Laplacian (Schofield & Zhu
  2003 and its wrapped-difference variant). Fast and robust to noise, but **not congruent**:
  it differs from the true phase by a smooth harmonic function (plus a constant), which
  background field removal later removes.
* :func:`unwrap_quality_guided`: reliability-sorted path following (scikit-image's 3D
  Abdul-Rahman algorithm, or a ROMEO-type maximum spanning tree that also uses the
  magnitude). Exact: the output is the input plus integer multiples of 2 pi.
* :func:`remove_phase_offset`: MCPC-3D-S phase-offset estimation for coil-combined
  multi-echo data.
* :func:`unwrap_multi_echo`: offset removal, then the registered unwrapping method
  (:mod:`qsmprep.methods`, stage ``unwrap``): spatial unwrapping of a template echo and
  temporal unwrapping of the others (ROMEO, :func:`unwrap_echoes_quality`), or Laplacian
  unwrapping of every echo (:func:`unwrap_echoes_laplacian`).

All phases are in radians; wrapped phase lies in ``[-pi, pi)``.

Modules: ``laplacian``, ``quality`` (region growing, spanning tree), ``multi_echo`` (offsets,
the registered multi-echo methods) and ``phase`` (``TWO_PI``, :func:`wrap_phase` and the helpers
they share); this package re-exports their public names and holds the choice of method
(:func:`resolve_method`).
"""

from __future__ import annotations

from qsmprep import methods as _registry
from qsmprep.recon.unwrap.laplacian import unwrap_laplacian
from qsmprep.recon.unwrap.multi_echo import (
    remove_phase_offset,
    unwrap_echoes_laplacian,
    unwrap_echoes_quality,
    unwrap_multi_echo,
)
from qsmprep.recon.unwrap.phase import wrap_phase
from qsmprep.recon.unwrap.quality import unwrap_quality_guided

__all__ = [
    "AUTO_ONE_ECHO",
    "remove_phase_offset",
    "resolve_method",
    "unwrap_echoes_laplacian",
    "unwrap_echoes_quality",
    "unwrap_laplacian",
    "unwrap_multi_echo",
    "unwrap_quality_guided",
    "wrap_phase",
]

AUTO_ONE_ECHO = "laplacian"
"""The unwrapping ``"auto"`` runs on one echo (:func:`resolve_method`)."""


def resolve_method(method: str, n_echoes: int) -> str:
    """The unwrapping method for an acquisition of ``n_echoes``, and a check of the name.

    ``"auto"`` is the registry's default unwrapping (:mod:`qsmprep.methods`; quality-guided
    region growing with temporal unwrapping) for two or more echoes, and
    :data:`AUTO_ONE_ECHO` (the Laplacian method) for one echo, where no earlier echo guides the
    unwrapping and the field at the brain's edge can change by more than pi between voxels (on
    a 3 mm phantom at TE 8 ms, the Laplacian method's TKD NRMSE was 137 % against 229 % for
    region growing). Any other name must be a registered unwrapping method.
    """
    choices = ("auto", *_registry.names("unwrap"))
    if method not in choices:
        raise ValueError(f"unwrap method must be one of {choices}, got {method!r}")
    if method != "auto":
        return method
    return _registry.defaults("unwrap")[0] if int(n_echoes) >= 2 else AUTO_ONE_ECHO
