"""Derivative names and the derivative dataset's description.

:func:`derivative_path` implements qsmprep's derivative naming table (all under
``output_dir/sub-<label>[/ses-<label>]/anat/``)::

    <prefix>_desc-brain_mask.nii.gz        <prefix>_desc-local_mask.nii.gz
    <prefix>_desc-total_fieldmap.nii.gz    <prefix>_desc-local_fieldmap.nii.gz
    <prefix>_desc-noise_fieldmap.nii.gz    <prefix>_desc-<method>_Chimap.nii.gz
    <prefix>_metrics.tsv / .json           sub-<label>[_ses-<label>]_desc-cosmos_Chimap.nii.gz
    <prefix>_R2starmap.nii.gz (1/s)        <prefix>_T2starmap.nii.gz (s)
    <prefix>_S0map.nii.gz
    <prefix>_desc-swi_T2starw.nii.gz       <prefix>_desc-minip_T2starw.nii.gz
    <prefix>_desc-smwipara_T2starw.nii.gz  <prefix>_desc-smwidia_T2starw.nii.gz

with ``<prefix> = sub-<label>[_ses-<label>][_acq-<label>][_rec-<label>][_run-<index>]``
(:attr:`Acquisition.prefix <qsmprep.bids.acquisition.Acquisition.prefix>`);
:func:`write_dataset_description` writes the derivative dataset's
``dataset_description.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from qsmprep.__about__ import __version__
from qsmprep.bids.acquisition import LABEL, Acquisition, entity_prefix

__all__ = ["BIDS_VERSION", "derivative_path", "write_dataset_description"]

BIDS_VERSION = "1.9.0"
"""BIDS version of the derivative dataset (``dataset_description.json``)."""


def _check_label(value, what: str) -> str:
    s = str(value)
    if not LABEL.fullmatch(s):
        raise ValueError(f"{what} must be alphanumeric (a BIDS label), got {value!r}")
    return s


def derivative_path(
    output_dir,
    acq_or_entities,
    *,
    desc: str | None = None,
    suffix: str,
    extension: str = ".nii.gz",
    datatype: str = "anat",
) -> Path:
    """Path of a qsmprep derivative (the naming table in the module doc).

    ``output_dir/sub-<label>[/ses-<label>]/<datatype>/<prefix>[_desc-<desc>]_<suffix><ext>``.

    Parameters
    ----------
    output_dir : path
        Root of the derivative dataset.
    acq_or_entities : Acquisition, dict or tuple
        An :class:`Acquisition` (its :attr:`~Acquisition.prefix`); a dict with ``subject`` and
        optionally ``session``, ``acq`` (or ``acquisition``), ``rec`` (or ``reconstruction``),
        ``run`` (labels with or without their prefixes); or a ``(subject, session)`` tuple, the
        key of :func:`group_orientations` -- e.g. ``derivative_path(out, ("01", None),
        desc="cosmos", suffix="Chimap")`` is ``out/sub-01/anat/sub-01_desc-cosmos_Chimap.nii.gz``.
    desc : str, optional
        ``desc-`` label (``brain``, ``local``, ``total``, ``noise``, a method name, ...).
    suffix : str
        ``mask``, ``fieldmap``, ``Chimap``, ``R2starmap``, ``T2starmap``, ``S0map``,
        ``metrics``, ...
    extension : str
        ``.nii.gz`` (default), ``.json``, ``.tsv``, ...
    datatype : str
        Folder under the subject/session (default ``anat``).
    """
    if isinstance(acq_or_entities, Acquisition):
        a = acq_or_entities
        ent = (a.subject, a.session, a.acq, a.rec, a.run)
    elif isinstance(acq_or_entities, Mapping):
        e = acq_or_entities

        def get(*names):
            for n in names:
                if e.get(n) is not None:
                    return str(e[n])
            return None

        ent = (
            get("subject", "sub"),
            get("session", "ses"),
            get("acq", "acquisition"),
            get("rec", "reconstruction"),
            get("run"),
        )
    elif isinstance(acq_or_entities, tuple) and len(acq_or_entities) == 2:
        ent = (acq_or_entities[0], acq_or_entities[1], None, None, None)
    else:
        raise TypeError(
            "acq_or_entities must be an Acquisition, a dict of entities or a (subject, session)"
            f" tuple, got {type(acq_or_entities).__name__}"
        )
    if ent[0] is None:
        raise ValueError("derivative_path needs a subject label")
    keys = ("sub", "ses", "acq", "rec", "run")
    clean = []
    for k, v in zip(keys, ent, strict=True):
        if v is None:
            clean.append(None)
            continue
        v = str(v)
        if v.startswith(f"{k}-"):
            v = v[len(k) + 1 :]
        clean.append(_check_label(v, k))
    sub, ses = clean[0], clean[1]
    name = entity_prefix(*clean)
    if desc is not None:
        name += f"_desc-{_check_label(desc, 'desc')}"
    name += f"_{_check_label(suffix, 'suffix')}"
    if not extension.startswith("."):
        extension = "." + extension
    folder = Path(output_dir) / f"sub-{sub}"
    if ses is not None:
        folder = folder / f"ses-{ses}"
    return folder / datatype / (name + extension)


def write_dataset_description(output_dir, *, bids_dir=None) -> Path:
    """Write ``output_dir/dataset_description.json`` of the qsmprep derivative dataset.

    ``DatasetType`` derivative, BIDS 1.9.0, ``GeneratedBy`` qsmprep with its version, and
    ``SourceDatasets`` (a ``file://`` URL) when ``bids_dir`` is given. Written to a temporary
    name and renamed, so the file is always complete (concurrent array jobs write the same
    content); an existing file is replaced.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    desc = {
        "Name": "qsmprep: quantitative susceptibility maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "qsmprep",
                "Version": __version__,
                "Description": "Quantitative susceptibility mapping from multi-echo GRE "
                "magnitude and phase",
            }
        ],
    }
    if bids_dir is not None:
        desc["SourceDatasets"] = [{"URL": Path(bids_dir).resolve().as_uri()}]
    from qsmprep._atomic import write_text

    return write_text(out / "dataset_description.json", json.dumps(desc, indent=2) + "\n")
