"""SWI workflow: susceptibility-weighted image, its minIP and SMWI of one acquisition."""

from __future__ import annotations

from collections.abc import Mapping

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from qsmprep.interfaces import ComputeSMWI, ComputeSWI
from qsmprep.recon.swi import SMWI_DEFAULTS, SWI_DEFAULTS, smwi_method_of
from qsmprep.workflows._util import params_of

__all__ = ["SMWI_DEFAULTS", "SWI_DEFAULTS", "init_swi_wf", "smwi_method_of"]


def init_swi_wf(
    *,
    method_params: Mapping[str, Mapping] | None = None,
    smwi_method: str | None = None,
    name: str = "swi_wf",
) -> pe.Workflow:
    """SWI and minIP from the echoes' magnitude and the total field; SMWI from a Chimap.

    Workflow graph::

        inputnode -> compute_swi -> outputnode
                               \\-> compute_smwi (with smwi_method) -> outputnode

    Parameters
    ----------
    method_params : dict, optional
        Sections ``"swi"`` (``sigma_mm``, ``power``, ``te``, ``combine``, ``slab_mm``) and
        ``"smwi"`` (``threshold``, ``power``).
    smwi_method : str, optional
        Name of the Chimap fed to ``inputnode.chimap`` (its sidecar names it); no SMWI
        without it.
    name : str
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    magnitude
        4D magnitude (echoes last).
    total_field, mask
        Total field (Hz) and where it is valid (the reliable brain mask).
    echo_times
        s.
    chimap
        Chimap (ppm) of ``smwi_method``.

    Outputs (``outputnode``)
    ------------------------
    swi, minip, magnitude, swi_meta, minip_meta
        The SWI, its minIP (own grid), the combined magnitude, sidecar entries.
    smwi_para, smwi_dia, smwi_meta
        The SMWI (with ``smwi_method``).
    """
    swi_params = {**SWI_DEFAULTS, **params_of(method_params, "swi")}
    smwi_params = {**SMWI_DEFAULTS, **params_of(method_params, "smwi")}
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=["magnitude", "total_field", "mask", "echo_times", "chimap"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        IdentityInterface(
            fields=[
                "swi", "minip", "magnitude", "swi_meta", "minip_meta",
                "smwi_para", "smwi_dia", "smwi_meta",
            ]
        ),
        name="outputnode",
    )  # fmt: skip
    compute_swi = pe.Node(ComputeSWI(params=swi_params), name="compute_swi", n_procs=1)
    workflow.connect([
        (inputnode, compute_swi, [
            ("magnitude", "magnitude"), ("total_field", "total_field"), ("mask", "mask"),
            ("echo_times", "echo_times"),
        ]),
        (compute_swi, outputnode, [
            ("swi", "swi"), ("minip", "minip"), ("magnitude", "magnitude"),
            ("meta", "swi_meta"), ("minip_meta", "minip_meta"),
        ]),
    ])  # fmt: skip
    p = swi_params
    workflow.__desc__ = (
        "A susceptibility-weighted image (SWI; Reichenbach et al., 1997; Haacke et al., 2004) "
        "was computed in the manner of CLEAR-SWI (Eckstein et al., 2021): the magnitude "
        + (
            "was combined over echoes by root-sum-of-squares"
            if p["combine"] == "rss"
            else "was averaged over echoes with echo-time weights"
        )
        + ", and the total field fitted to the unwrapped phase of all echoes was high-passed "
        f"by subtracting its Gaussian smoothing (sigma {p['sigma_mm']:g} mm) within the "
        "reliable brain mask and converted to the phase at "
        + (f"an echo time of {p['te']:g} s" if p.get("te") else "the longest echo time")
        + ". A phase mask equal to 1 for negative phase and falling linearly from 1 to 0 "
        "between 0 and pi for positive (paramagnetic) phase was raised to the power "
        f"{p['power']:g} and multiplied with the combined magnitude; outside the brain mask the "
        "SWI is the combined magnitude. Minimum intensity projections were computed over "
        f"sliding slabs of {p['slab_mm']:g} mm along the axis closest to the head's "
        "superior-inferior axis."
    )
    workflow.__citations__ = ["swi1997", "swi2004", "clearswi"]
    if smwi_method is not None:
        compute_smwi = pe.Node(ComputeSMWI(params=smwi_params), name="compute_smwi")
        workflow.connect([
            (inputnode, compute_smwi, [("chimap", "chimap")]),
            (compute_swi, compute_smwi, [("magnitude", "magnitude")]),
            (compute_smwi, outputnode, [
                ("para", "smwi_para"), ("dia", "smwi_dia"), ("meta", "smwi_meta"),
            ]),
        ])  # fmt: skip
        q = smwi_params
        workflow.__desc__ += (
            " Susceptibility-map-weighted images (SMWI; Gho et al., 2014; Nam et al., 2017) "
            f"were made from the {smwi_method} susceptibility map: the combined magnitude was "
            "multiplied with a paramagnetic mask (1 for negative chi, falling linearly to 0 at "
            f"{q['threshold']:g} ppm) and, separately, with the diamagnetic mirror of that "
            f"mask, each to the power {q['power']:g}."
        )
        workflow.__citations__ += ["smwi2014", "smwi2017"]
    return workflow
