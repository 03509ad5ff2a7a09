"""Nipype workflow builders (sMRIPrep style): they only wire interfaces together.

===============================  =================================================  =============
builder                          builds                                             module
===============================  =================================================  =============
``init_participant_wf``          all acquisitions of a subject + COSMOS groups      ``base``
``init_qsm_wf``                  one acquisition: field, inversion, metrics, sinks  ``qsm``
``init_field_wf``                mask, unwrapping, field fit, background            ``field``
``init_inversion_wf``            one DipoleInversion node per method                ``inversion``
``init_metrics_wf``              metrics table of one acquisition                   ``metrics``
``init_cosmos_wf``               COSMOS of an orientation group                     ``cosmos``
``init_swi_wf``                  SWI, minIP and SMWI of one acquisition             ``swi``
``init_qsm_derivatives_wf``      sinks of one acquisition's maps                    ``outputs``
``init_metrics_derivatives_wf``  sinks of a metrics table                           ``outputs``
``init_cosmos_derivatives_wf``   sink of a COSMOS map                               ``outputs``
``init_swi_derivatives_wf``      sinks of the SWI, minIP and SMWI                   ``outputs``
===============================  =================================================  =============

Every builder is ``init_<thing>_wf(*, keyword options, name="<thing>_wf")`` and returns a
workflow whose public face is its ``inputnode`` and ``outputnode``; node names equal the
variable names in the builder. Each workflow carries a methods paragraph (``__desc__``) and
citation keys (``__citations__``) that reflect the options used;
:func:`methods_description` gathers them.

Embedding one acquisition's workflow in a larger pipeline::

    from qsmprep.bids import collect_acquisitions
    from qsmprep.workflows import init_qsm_wf

    acq = collect_acquisitions("/data/bids", participant_label=["01"])[0]
    qsm_wf = init_qsm_wf(acquisition=acq, output_dir="/data/out", methods=["tkd", "medi"])
    my_pipeline.connect(qsm_wf, "outputnode.chimaps", my_node, "in_files")

Reruns with the same work directory reuse every finished node (Nipype's hash-based cache):
node inputs are options and file paths only, and interface outputs are deterministic.
"""

from qsmprep.workflows._util import gpu_work
from qsmprep.workflows.base import init_participant_wf, long_node_threads, methods_description
from qsmprep.workflows.cosmos import init_cosmos_wf
from qsmprep.workflows.field import init_field_wf
from qsmprep.workflows.inversion import init_inversion_wf
from qsmprep.workflows.metrics import init_metrics_wf
from qsmprep.workflows.outputs import (
    init_cosmos_derivatives_wf,
    init_metrics_derivatives_wf,
    init_qsm_derivatives_wf,
    init_swi_derivatives_wf,
)
from qsmprep.workflows.qsm import init_qsm_wf
from qsmprep.workflows.swi import init_swi_wf

__all__ = [
    "gpu_work",
    "init_cosmos_derivatives_wf",
    "init_cosmos_wf",
    "init_field_wf",
    "init_inversion_wf",
    "init_metrics_derivatives_wf",
    "init_metrics_wf",
    "init_participant_wf",
    "init_qsm_derivatives_wf",
    "init_qsm_wf",
    "init_swi_derivatives_wf",
    "init_swi_wf",
    "long_node_threads",
    "methods_description",
]
