"""Methods paragraph with citations, generated from the effective settings of a run.

:func:`methods_paragraph` writes a boilerplate description for a paper's methods section that
names every option that shaped the result (mask, unwrapping, background removal, inversion
methods and their parameters, referencing, reference maps and metrics), each with its
literature reference. The methods are described by their records in :mod:`qsmprep.methods`
(label, description, references, key parameters); a method without one is named without a
citation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qsmprep import methods as registry
from qsmprep.__about__ import __version__

__all__ = ["CITATIONS", "METHODS", "MethodsText", "methods_paragraph", "methods_text"]

#: References of the chain's fixed steps, by key (the methods' are in their records).
_CITATIONS: dict[str, str] = {
    "nipype": "Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and "
    "extensible neuroimaging data processing framework in Python. Front Neuroinform 2011;5:13.",
    "pybids": "Yarkoni T, Markiewicz CJ, de la Vega A, et al. PyBIDS: Python tools for BIDS "
    "datasets. J Open Source Softw 2019;4(40):1294.",
    "mcpc3ds": "Eckstein K, Dymerska B, Bachrata B, et al. Computationally efficient "
    "combination of multi-channel phase data from multi-echo acquisitions (ASPIRE). Magn Reson "
    "Med 2018;79:2996-3006.",
    "kressler": "Kressler B, de Rochefort L, Liu T, Spincemaille P, Jiang Q, Wang Y. Nonlinear "
    "regularization for per voxel estimation of magnetic susceptibility distributions from MRI "
    "field maps. IEEE Trans Med Imaging 2010;29:273-281.",
    "challenge2016": "Langkammer C, Schweser F, Shmueli K, et al. Quantitative susceptibility "
    "mapping: Report from the 2016 reconstruction challenge. Magn Reson Med "
    "2018;79:1661-1673.",
    "xsim": "Milovic C, Tejos C, Acosta-Cabronero J, et al. The 2016 QSM Challenge: Lessons "
    "learned and considerations for a future challenge design. Magn Reson Med "
    "2020;84:1624-1637.",
    "swi1997": "Reichenbach JR, Venkatesan R, Schillinger DJ, Kido DK, Haacke EM. Small "
    "vessels in the human brain: MR venography with deoxyhemoglobin as an intrinsic contrast "
    "agent. Radiology 1997;204:272-277.",
    "swi2004": "Haacke EM, Xu Y, Cheng YC, Reichenbach JR. Susceptibility weighted imaging "
    "(SWI). Magn Reson Med 2004;52:612-618.",
    "clearswi": "Eckstein K, Bachrata B, Hangel G, et al. Improved susceptibility weighted "
    "imaging at ultra-high field using bipolar multi-echo acquisition and optimized image "
    "processing: CLEAR-SWI. NeuroImage 2021;237:118175.",
    "smwi2014": "Gho SM, Liu C, Li W, et al. Susceptibility map-weighted imaging (SMWI) for "
    "neuroimaging. Magn Reson Med 2014;72:337-346.",
    "smwi2017": "Nam Y, Gho SM, Kim DH, Kim EY, Lee J. Imaging of nigrosome 1 in substantia "
    "nigra at 3T using multiecho susceptibility map-weighted imaging (SMWI). J Magn Reson "
    "Imaging 2017;46:528-536.",
    "liu2021": "Liu J, Koch KM. Exploring domain adaption for deep neural network trained "
    "QSM. Proc ISMRM 2021:3980; arXiv:2206.13225.",
    "ssim": "Wang Z, Bovik AC, Sheikh HR, Simoncelli EP. Image quality assessment: from error "
    "visibility to structural similarity. IEEE Trans Image Process 2004;13:600-612.",
}


class _Citations(Mapping):
    """Full references by key: the fixed steps' and those of every registered method."""

    def _all(self) -> dict[str, str]:
        return {**_CITATIONS, **registry.references()}

    def __getitem__(self, key: str) -> str:
        return self._all()[key]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


CITATIONS: Mapping[str, str] = _Citations()
"""Full references, by key (a live mapping: methods registered later are included)."""

METHODS = registry.view(("background", "inversion"))
"""Background-removal and inversion methods (a live view of :mod:`qsmprep.methods`): label,
description, citations and key parameters of each."""

_MASKS = registry.view("mask")
_UNWRAPS = registry.view("unwrap")
"""Mask and unwrapping methods (live views): their parameters are in the ``--config`` section
of their stage (:data:`qsmprep.methods.SECTIONS`)."""
_SECTION_MASK = registry.SECTIONS["mask"]
_SECTION_UNWRAP = registry.SECTIONS["unwrap"]

_SKIP = {"device", "info", "b0_dir", "pad"}


def _fmt_value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value)
    return str(value)


def _params(key: str, method_params: Mapping, spec=None) -> str:
    """``"radius 6 mm, alpha 0.0001"``: the parameters of section ``key``, then the defaults of
    the key ones of ``spec`` (default: the method named ``key``)."""
    spec = METHODS.get(key) if spec is None else spec
    given = dict(method_params.get(key) or {})
    shown = {}
    for k, v in given.items():
        if k not in _SKIP and isinstance(v, (int, float, str, bool, list, tuple)):
            shown[k] = v
    if spec is not None:
        for p in spec.parameters:
            if p.key and p.name not in shown and p.default is not None:
                shown[p.name] = p.default
    parts = []
    for k, v in shown.items():
        if k == "correct" and isinstance(v, bool):
            parts.append(f"scale correction {'on' if v else 'off'}")
            continue
        p = spec.parameter(k) if spec is not None else None
        unit = p.unit if p is not None else ""
        parts.append(f"{k} {_fmt_value(v)}" + (f" {unit}" if unit else ""))
    return ", ".join(parts)


@dataclass
class MethodsText:
    """A methods paragraph with numbered citations ``[n]`` and the numbered reference list."""

    paragraph: str
    references: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        refs = "\n".join(f"[{i}] {r}" for i, r in enumerate(self.references, start=1))
        return f"{self.paragraph}\n\nReferences\n{refs}" if refs else self.paragraph


class _Cite:
    def __init__(self):
        self.keys: list[str] = []

    def __call__(self, *keys: str) -> str:
        nums = []
        for k in keys:
            if k not in CITATIONS:
                continue
            if k not in self.keys:
                self.keys.append(k)
            nums.append(self.keys.index(k) + 1)
        return f" [{', '.join(map(str, nums))}]" if nums else ""


def _get(settings: Mapping, key: str, default=None):
    value = settings.get(key, default)
    return default if value is None else value


def _unwrapping(s: Mapping, n_echoes: int):
    """The unwrapping method of the settings for ``n_echoes`` (``"auto"`` resolved) and its
    record (None when it is not registered)."""
    name = str(_get(s, "unwrap", "auto"))
    if name == "auto":
        from qsmprep.recon.unwrap import resolve_method

        name = resolve_method(name, n_echoes)
    return name, _UNWRAPS.get(name)


def _unwrapped_with(s: Mapping, mp: Mapping, cite: _Cite, n_echoes: int) -> str:
    """``"with the ROMEO method [n] (description; parameters)"``: the unwrapping of the
    settings (for one echo without its multi-echo description)."""
    name, spec = _unwrapping(s, n_echoes)
    params = _params(_SECTION_UNWRAP, mp, spec)
    if spec is None:
        return f"with the unwrapping method {name}" + (f" ({params})" if params else "")
    text = f"with the {spec.label} method{cite(*_keys(spec, mp))}"
    if n_echoes == 1:
        return text + (f" ({params})" if params else "")
    return f"{text} ({_join(spec.description, params)})"


def _multi_echo_sentences(s: Mapping, mp: Mapping, cite: _Cite) -> list[str]:
    """Offset removal, unwrapping, multi-echo fit and reliability of the methods paragraph."""
    return [
        f"The phase offset was removed (MCPC-3D-S{cite('mcpc3ds')}) and the phase of the "
        f"echoes was unwrapped {_unwrapped_with(s, mp, cite, 2)}.",
        "The total field (Hz) and its noise standard deviation were estimated voxel by voxel "
        f"from a magnitude-weighted linear fit of phase against echo time{cite('kressler')}; "
        "voxels whose magnitude-weighted RMS residual about that fit exceeded the median of the "
        "deep brain by more than six robust standard deviations were marked unreliable.",
    ]


def _single_echo_sentences(s: Mapping, mp: Mapping, cite: _Cite) -> list[str]:
    """The same for single-echo acquisitions: no offset removal, no fit, no reliability."""
    return [
        "The acquisitions had a single echo, so the echo-independent phase offset could not "
        "be separated from the field and was not removed; the phase was unwrapped "
        f"{_unwrapped_with(s, mp, cite, 1)}.",
        "The total field (Hz) was the unwrapped phase divided by 2 pi TE, and its noise "
        "standard deviation the phase noise (noise standard deviation over magnitude) divided "
        f"by 2 pi TE, the one-echo case of the magnitude-weighted fit{cite('kressler')}; with "
        "no multi-echo fit residual, no voxel was marked unreliable.",
    ]


def methods_text(settings: Mapping | None = None, *, cosmos: bool = False) -> MethodsText:
    """The methods paragraph and its reference list (see :func:`methods_paragraph`)."""
    s = dict(settings or {})
    mp = dict(_get(s, "method_params", {}) or {})
    cite = _Cite()
    out = []
    out.append(
        f"Susceptibility maps were computed with qsmprep {_get(s, 'version', __version__)}, "
        f"a BIDS App built on Nipype{cite('nipype')} and PyBIDS{cite('pybids')}."
    )
    out.extend(_mask_sentences(s, mp, cite))
    pre = _input_sentences(s)
    if pre:
        out.append("Before processing, " + " and ".join(pre) + ".")
    out.extend(_field_sentences(s, mp, cite))
    bg = str(_get(s, "bg_method", "resharp"))  # settings files before lbv was the default
    out.extend(_background_sentences(s, mp, cite, bg))
    out.extend(_inversion_sentences(s, mp, cite, bg))
    out.append(
        "Each susceptibility map was referenced to its mean within the mask it covers, and "
        "its data consistency was reported as the residual "
        "100 ||M (D chi - f)|| / ||M f|| (%) in the mask M of reliable local-field voxels."
    )
    out.extend(_r2star_sentences(s, cite))
    out.extend(_swi_sentences(s, mp, cite))
    out.extend(_comparison_sentences(s, cite, cosmos))
    return MethodsText(" ".join(out), [CITATIONS[k] for k in cite.keys])


def _mask_sentences(s: Mapping, mp: Mapping, cite: _Cite) -> list[str]:
    """How the brain mask was made."""
    if s.get("mask_dir"):
        return [
            "For each acquisition, the brain mask was provided by the user (from "
            f"{_basename(s['mask_dir'])}) and used as given."
        ]
    name = str(_get(s, "mask_method", registry.defaults("mask")[0]))
    spec = _MASKS.get(name)
    params = _params(_SECTION_MASK, mp, spec)
    if spec is None:
        return [
            f"For each acquisition, a brain mask was computed with the mask method {name}"
            + (f" ({params})." if params else ".")
        ]
    return [
        f"For each acquisition, a brain mask was computed with the {spec.label}"
        f"{cite(*_keys(spec, mp))} ({_join(spec.description, params)})."
    ]


def _input_sentences(s: Mapping) -> list[str]:
    """Corrections of the inputs before processing."""
    out = []
    units = _get(s, "phase_units", [])
    units = [units] if isinstance(units, str) else list(units)
    if any(str(u).lower().startswith("int") for u in units):
        out.append("phase images stored as scanner integers were rescaled to radians")
    if int(_get(s, "phase_sign", 1)) < 0:
        out.append("the phase sign was inverted")
    if s.get("b0") is not None:
        out.append(f"the field strength was set to {_fmt_value(float(s['b0']))} T")
    return out


def _field_sentences(s: Mapping, mp: Mapping, cite: _Cite) -> list[str]:
    """Unwrapping and the total field: provided, single-echo or multi-echo."""
    out = []
    counts = {int(n) for n in _get(s, "echo_counts", []) or []}
    if s.get("field_dir"):
        out.append(
            f"The total field (Hz) was provided by the user (from {_basename(s['field_dir'])}), "
            "so the phase was neither unwrapped nor fitted over the echoes; its noise standard "
            "deviation was taken as that of a magnitude-weighted linear fit of the echoes"
            f"{cite('kressler')}, and with no fit residual no voxel was marked unreliable."
        )
    elif counts == {1}:
        out.extend(_single_echo_sentences(s, mp, cite))
    else:
        out.extend(_multi_echo_sentences(s, mp, cite))
        if 1 in counts:
            out.append(
                "Acquisitions with a single echo were processed likewise, except that the "
                "phase offset, which one echo cannot separate from the field, was not removed, "
                "the total field was the unwrapped phase divided by 2 pi TE (its noise standard "
                "deviation the phase noise divided by 2 pi TE), and no voxel was marked "
                "unreliable, there being no fit residual."
            )
    return out


def _background_sentences(s: Mapping, mp: Mapping, cite: _Cite, bg: str) -> list[str]:
    """Background field removal with ``bg``."""
    out = []
    spec = METHODS.get(bg)
    params = _params(bg, mp)
    if spec is not None and spec.keeps_mask:
        out.append(
            f"Background fields were removed with {spec.label}{cite(*_keys(spec, mp))} "
            f"({_join(spec.description, params)}) on the brain mask less the unreliable voxels "
            "within 6 mm of its edge, which defined the local-field mask. Its local field was "
            f"checked against V-SHARP's{cite('vsharp')} inside the latter's mask, and "
            f"RESHARP's{cite('resharp')} was used instead where the two differed by more than "
            "75 % (NRMSE); the sidecar of each local field names the method used."
        )
    elif spec is not None and bg == "tfibg":
        fill = bool((mp.get(bg) or {}).get("fill", True))
        out.append(
            f"Background fields were removed with {spec.label}{cite(*_keys(spec, mp))} "
            f"({_join(spec.description, params)}) over the whole brain mask, with no data "
            "weight on the unreliable voxels; "
            + (
                "there, the local field was the field of the sources the inversion placed "
                "inside the brain, and the local-field mask was the brain mask."
                if fill
                else "these were left out of the local-field mask."
            )
        )
    elif spec is not None:
        out.append(
            f"Background fields were removed with {spec.label}{cite(*_keys(spec, mp))} "
            f"({_join(spec.description, params)}), which also defined the local-field mask."
        )
    else:
        out.append(
            f"Background fields were removed with {bg}" + (f" ({params})." if params else ".")
        )
    return out


def _inversion_sentences(s: Mapping, mp: Mapping, cite: _Cite, bg: str) -> list[str]:
    """The dipole inversions, the whole-brain ones and the networks' local field."""
    out = []
    clauses = []
    for method in _get(s, "methods", list(registry.defaults("inversion"))):
        spec = METHODS.get(method)
        params = _params(method, mp)
        if spec is None:
            clauses.append(f"{method}" + (f" ({params})" if params else ""))
            continue
        clauses.append(f"{spec.label}{cite(*_keys(spec, mp))} ({_join(spec.description, params)})")
    if clauses:
        listed = (
            clauses[0] if len(clauses) == 1 else "; ".join(clauses[:-1]) + "; and " + clauses[-1]
        )
        out.append(
            "The local field, converted to ppm of B0, was inverted to magnetic susceptibility "
            "with the B0 direction taken from the image orientation, using "
            f"{listed}."
        )
    chosen = list(_get(s, "methods", []))
    whole = [METHODS[m].label for m in chosen if m in METHODS and METHODS[m].whole_brain]
    if whole:
        out.append(
            f"{' and '.join(whole)} estimated susceptibility over the whole brain mask, with the "
            "data term weighted by the inverse field noise and set to zero outside the "
            "local-field mask and in unreliable voxels, where the regularizer alone determined "
            "it; the other maps cover the local-field mask."
        )
    if bg != "resharp" and any(m in registry.names(kind="dl") for m in chosen):
        out.append(
            "The networks were given a local field made with RESHARP, as their training data were."
        )
    adapted = [METHODS[m].label for m in chosen if m in ("dsbn", "dcfinetune") and m in METHODS]
    if _get(s, "dl_adapt", False) and adapted:
        steps = _get(s, "dl_adapt_steps", 300)
        out.append(
            f"Before inference, {' and '.join(adapted)} were adapted without labels to the "
            f"RESHARP local fields of all acquisitions of this run ({steps} optimiser steps "
            "each: target-domain batch normalisation with the data-consistency loss beside "
            "the supervised loss on synthetic data, or fine-tuning by data consistency alone), "
            f"as in the domain-adaptation protocol{cite('liu2021')}; the adapted weights, with "
            "their model cards and SHA-256, are in models/dl-adapt/ of the output dataset."
        )
    return out


def _r2star_sentences(s: Mapping, cite: _Cite) -> list[str]:
    """The R2* (and T2*) maps."""
    out = []
    r2m = [m for m in _get(s, "r2star_methods", []) or [] if m in registry.names("r2star")]
    if r2m:
        how = " or ".join(registry.get(m).description for m in r2m)
        cites = cite(*[c.key for m in r2m for c in registry.get(m).citations])
        out.append(
            "R2* maps (1/s) were fitted to the magnitude of the echoes in the brain mask, "
            f"S = S0 exp(-R2* TE), {how}{cites}, and clipped to [0, 1000] 1/s; T2* maps are "
            "1/R2* (at most 1 s)."
        )
    return out


def _comparison_sentences(s: Mapping, cite: _Cite, cosmos: bool) -> list[str]:
    """The comparison with the reference and the COSMOS map."""
    out = []
    ref = s.get("reference")
    if ref:
        out.append(
            f"Maps were compared with the reference map {_basename(ref)} using the normalized "
            f"root-mean-square error and the high-frequency error norm{cite('challenge2016')}, "
            f"the structural similarity{cite('ssim')}, XSIM{cite('xsim')}, the peak "
            "signal-to-noise ratio and the regression slope."
        )
    if cosmos:
        text = (
            "Several head orientations of one subject on one grid were combined into a COSMOS "
            f"map{cite('cosmos')}"
        )
        if ref:
            out.append(text + ".")
        else:
            out.append(
                text + ", which served as the reference for the normalized root-mean-square "
                f"error, the high-frequency error norm{cite('challenge2016')}, the structural "
                f"similarity{cite('ssim')}, XSIM{cite('xsim')}, the peak signal-to-noise "
                "ratio and the regression slope."
            )
    return out


def _swi_sentences(s: Mapping, mp: Mapping, cite: _Cite) -> list[str]:
    """SWI, minIP and SMWI, when ``outputs`` selects ``swi`` (settings without it: all)."""
    from qsmprep.recon.swi import SMWI_DEFAULTS, SWI_DEFAULTS, smwi_method_of

    outputs = _get(s, "outputs", ("chi", "r2star", "swi"))
    if "swi" not in outputs:
        return []
    p = {**SWI_DEFAULTS, **dict(mp.get("swi") or {})}
    combine = (
        "combined over echoes by root-sum-of-squares"
        if p.get("combine", "rss") == "rss"
        else "averaged over echoes with echo-time weights"
    )
    te = f"an echo time of {_fmt_value(p['te'])} s" if p.get("te") else "the longest echo time"
    out = [
        f"Susceptibility-weighted images (SWI{cite('swi1997', 'swi2004')}) were computed in "
        f"the manner of CLEAR-SWI{cite('clearswi')}: the magnitude was {combine}, and the "
        "total field was high-passed by subtracting its Gaussian smoothing (sigma "
        f"{_fmt_value(p['sigma_mm'])} mm) within the reliable brain mask and converted to the "
        f"phase at {te}. A phase mask, 1 for negative phase and falling linearly from 1 to 0 "
        "between 0 and pi for positive (paramagnetic) phase, was raised to the power "
        f"{_fmt_value(p['power'])} and multiplied with the combined magnitude over the whole "
        "head. Minimum intensity projections were computed over sliding slabs of "
        f"{_fmt_value(p['slab_mm'])} mm along the axis closest to the superior-inferior axis."
    ]
    source = smwi_method_of(_get(s, "methods", list(registry.defaults("inversion"))))
    if "chi" in outputs and source is not None:
        q = {**SMWI_DEFAULTS, **dict(mp.get("smwi") or {})}
        name = METHODS[source].label if source in METHODS else source
        out.append(
            "Susceptibility-map-weighted images (SMWI"
            f"{cite('smwi2014', 'smwi2017')}) were made from the {name} map: the combined "
            "magnitude was multiplied with a paramagnetic mask (1 for negative susceptibility, "
            f"falling linearly to 0 at {_fmt_value(q['threshold'])} ppm) and, separately, with "
            f"its diamagnetic mirror, each to the power {_fmt_value(q['power'])}."
        )
    return out


def _keys(spec, method_params: Mapping) -> list[str]:
    """Citation keys of a method: its references, then those of parameters given as true (in
    its ``--config`` section: its name, or its stage's, :data:`qsmprep.methods.SECTIONS`)."""
    given = method_params.get(registry.SECTIONS.get(spec.stage, spec.name)) or {}
    extra = [c.key for p in spec.parameters if given.get(p.name) for c in p.citations]
    return [c.key for c in spec.citations] + extra


def _join(description: str, params: str) -> str:
    return f"{description}; {params}" if params else description


def _basename(path) -> str:
    return str(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def methods_paragraph(settings: Mapping | None = None, *, cosmos: bool = False) -> str:
    """A methods paragraph with numbered citations that reflects the options of a run.

    Parameters
    ----------
    settings : mapping, optional
        The effective settings (``Settings.to_dict()``, or ``qsmprep_settings.json``). Keys
        read: ``methods``, ``outputs``, ``bg_method``, ``unwrap``, ``mask_method``,
        ``mask_dir`` and ``field_dir`` (provided brain masks and total fields), ``phase_sign``,
        ``b0``, ``reference``, ``phase_units`` (input units found, e.g. ``["integer"]``),
        ``r2star_methods`` (R2* estimators used, from the R2starmap sidecars),
        ``method_params`` (``{method: {param: value}}``; parameters not
        given are shown at the defaults of the ``qsmprep.recon`` function), ``version``.
        Missing keys take the defaults of the command line.
    cosmos : bool
        Mention the COSMOS map computed from several head orientations.

    Returns
    -------
    str
        The paragraph, a blank line, ``References`` and the numbered references.
    """
    return str(methods_text(settings, cosmos=cosmos))
