"""The method registry: the one place where a processing method is declared.

Every brain mask, phase unwrapping, background removal, dipole inversion (classical,
multi-orientation and deep-learning) and R2* estimator of qsmprep is one :class:`Method` record
here: its stage, the function that implements it (a ``"module:function"`` string, imported
only when the method runs), its display label, the phrases that describe it in the methods
paragraph and the workflow boilerplate, its references, its parameters (defaults and units),
the extra inputs its function takes, and for a network its architecture and default weights.
The command line (``--methods``, ``--bg-method``, ``--unwrap``, ``--mask-method``, ``--config``
sections), the settings, the interfaces, the workflow builders, the reports, the benchmarks and
the documentation's method tables all read these records, so adding a method is one algorithm
file and one :func:`register` call::

    from qsmprep.methods import Method, Parameter, Reference, register

    register(Method(
        name="ndi", stage="inversion", implementation="qsmprep.recon.inversion.ndi:ndi",
        label="NDI", description="nonlinear dipole inversion by gradient descent",
        summary="nonlinear dipole inversion (NDI; Polak et al., 2020)",
        citations=(Reference("ndi", "Polak D, Chatnuntawech I, ... NMR Biomed 2020;33:e4271."),),
        parameters=(Parameter("max_iter", 200, "", "gradient-descent iterations", key=True),),
    ))

This module imports only the standard library: every layer of the package may read it.
Records are kept in registration order, which is the order of the command line's help, the
reports and the documentation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import Any

__all__ = [
    "INPUTS",
    "KINDS",
    "SECTIONS",
    "STAGES",
    "STAGE_INPUTS",
    "Method",
    "Parameter",
    "Reference",
    "defaults",
    "get",
    "markdown",
    "names",
    "records",
    "references",
    "register",
    "registered",
    "resolve",
    "unregister",
    "view",
]

STAGES = {
    "mask": "Brain mask",
    "unwrap": "Phase unwrapping",
    "background": "Background field removal",
    "inversion": "Dipole inversion",
    "r2star": "R2* mapping",
}
"""Stages with registered methods, in the order of the chain, and their headings in the
documentation."""

SECTIONS = {"mask": "mask", "unwrap": "unwrap"}
"""Stages whose methods take their parameters from one ``--config`` section named after the
stage, whichever method runs; a method of another stage has a section of its own name."""

KINDS = {
    "classical": "a closed-form or iterative algorithm on one acquisition",
    "multi-orientation": "an algorithm on several head orientations of one subject",
    "dl": "a trained network (deep learning)",
}
"""Kinds of method: ``--methods`` offers the classical and deep-learning inversions."""

INPUTS = {
    "magnitude": "the echoes' magnitude, combined by root sum of squares (required)",
    "noise_std": "the field's noise standard deviation (1 where the field is unknown)",
    "data_mask": "the voxels whose local field is known and reliable",
    "weight": "data weight: 1 / field noise std where the field is known and reliable, else 0",
    "delta_te": "the echo spacing (s), from the echo times",
    "b0": "the field strength (T)",
    "b0_dir": "the B0 direction in voxel coordinates",
    "phase": "the wrapped phase of the echoes (rad), echoes last",
    "echo_times": "the echo times (s)",
}
"""Extra inputs a method's function may take, by keyword name: the interface, benchmark or
chain that calls it provides those a record lists (:attr:`Method.inputs`), of those its stage
offers (:data:`STAGE_INPUTS`). ``magnitude``, ``noise_std``, ``data_mask``, ``weight`` and
``phase`` are arrays; ``delta_te``, ``b0`` and ``b0_dir`` are parameters, which a value given
in the method's parameters overrides; ``echo_times`` are those of the acquisition."""

_FIELD_INPUTS = ("magnitude", "noise_std", "data_mask", "weight", "delta_te", "b0", "b0_dir")
STAGE_INPUTS = {
    "mask": ("phase", "echo_times"),
    "unwrap": (),
    "background": _FIELD_INPUTS,
    "inversion": _FIELD_INPUTS,
    "r2star": (),
}
"""The extra inputs (:data:`INPUTS`) the methods of each stage may take."""


@dataclass(frozen=True)
class Reference:
    """A literature reference: a citation key and its full text."""

    key: str
    text: str


@dataclass(frozen=True)
class Parameter:
    """A keyword parameter of a method's function, as the user sets it (``--config``).

    ``default`` is the function's own default (None: computed, see the description); ``key``
    parameters are named in the methods paragraph even at their default; ``citations`` are
    cited there when the parameter is given a true value (e.g. MEDI+0's ``lambda_csf``).
    """

    name: str
    default: Any = None
    unit: str = ""
    description: str = ""
    key: bool = False
    citations: tuple[Reference, ...] = ()


@dataclass(frozen=True)
class Method:
    """One processing method (see the module docstring).

    Attributes
    ----------
    name : str
        Its name on the command line, in ``--config`` sections (a mask or unwrapping method:
        see :data:`SECTIONS`) and as the ``desc-`` label of its outputs (alphanumeric).
    stage : str
        One of :data:`STAGES`.
    implementation : str
        ``"module:function"`` of the function that runs it (:func:`resolve`), called the way
        its stage calls them: a mask method by :func:`qsmprep.recon.chain.compute_brain_mask`,
        an unwrapping method by :func:`qsmprep.recon.unwrap.unwrap_multi_echo`, a background
        method by :func:`qsmprep.recon.background.remove_background`, an inversion by
        :class:`qsmprep.interfaces.DipoleInversion`, an R2* estimator by
        :func:`qsmprep.recon.r2star.fit_r2star`.
    label : str
        Display name in reports and tables, e.g. ``"TKD"``.
    description : str
        One line that follows the label in the methods paragraph and the documentation.
    summary : str
        The phrase of the workflow boilerplate, with author-year citations in the text.
    one_echo_summary : str
        The phrase for a single-echo acquisition where it differs from ``summary`` (an
        unwrapping method: no later echo is unwrapped in time); default ``summary``.
    citations : tuple of Reference
        What to cite whenever the method is used.
    parameters : tuple of Parameter
        The user-settable keyword parameters, with the function's defaults.
    inputs : tuple of str
        Extra inputs of the function (keys of :data:`INPUTS` its stage offers,
        :data:`STAGE_INPUTS`).
    kind : str
        One of :data:`KINDS`.
    default : bool
        Run by default: the default ``--methods`` (inversion), ``--bg-method`` (background),
        ``--mask-method`` (mask) or the unwrapping that ``--unwrap auto`` runs on two or more
        echoes (unwrap).
    whole_brain : bool
        Inversion with a per-voxel data weight: given the brain mask it covers all of it, with
        zero data weight where the local field is unknown or unreliable.
    field : str
        The field an inversion takes: ``"local"`` (after background removal) or ``"total"``
        (a total field inversion, which needs no background removal).
    keeps_mask : bool
        Background removal whose local field covers its whole input mask (no kernel erosion):
        it gets the brain mask less its unreliable rim, and is cross-checked.
    long_running : bool
        An iterative inversion that runs for tens of seconds on a 1 mm head and gains from a
        second thread (its FFTs): when ``--omp-nthreads`` is not given, the run's cores are
        shared among such nodes (:func:`qsmprep.threads.share_cores`), so that a lone one gets
        them all. Networks are left out: a forked worker's multi-threaded torch can hang
        (docs/performance.md).
    arch : str, optional
        Network architecture of a deep-learning method's checkpoints.
    weights : str, optional
        The registered model a deep-learning method runs by default.
    """

    name: str
    stage: str
    implementation: str
    label: str
    description: str
    summary: str = ""
    one_echo_summary: str = ""
    citations: tuple[Reference, ...] = ()
    parameters: tuple[Parameter, ...] = ()
    inputs: tuple[str, ...] = ()
    kind: str = "classical"
    default: bool = False
    whole_brain: bool = False
    field: str = "local"
    keeps_mask: bool = False
    long_running: bool = False
    arch: str | None = None
    weights: str | None = None

    def __post_init__(self):
        if not self.name.isalnum():
            raise ValueError(f"method name {self.name!r} must be alphanumeric (a desc- label)")
        if self.stage not in STAGES:
            raise ValueError(f"{self.name}: unknown stage {self.stage!r}; one of {list(STAGES)}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}; one of {list(KINDS)}")
        module, _, func = self.implementation.partition(":")
        if not module or not func:
            raise ValueError(f"{self.name}: implementation must be 'module:function'")
        offered = STAGE_INPUTS[self.stage]
        unknown = [i for i in self.inputs if i not in offered]
        if unknown:
            raise ValueError(
                f"{self.name}: unknown inputs {unknown} of a {self.stage} method; one of "
                f"{list(offered)}"
            )
        if self.field not in ("local", "total"):
            raise ValueError(f"{self.name}: field must be 'local' or 'total', got {self.field!r}")
        if self.kind == "dl" and not (self.arch and self.weights):
            raise ValueError(f"{self.name}: a deep-learning method needs arch and weights")

    @property
    def key_params(self) -> tuple[str, ...]:
        """Names of the parameters the methods paragraph shows at their defaults."""
        return tuple(p.name for p in self.parameters if p.key)

    def parameter(self, name: str) -> Parameter | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.parameters if p.name == name), None)


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (after the others) and return it.

    A name is registered once, whatever its stage (it names a ``--config`` section); pass
    ``replace=True`` to swap a record in place.
    """
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove the record of ``name`` from the registry and return it."""
    return _REGISTRY.pop(get(name).name)


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """``with registered(m):`` the method is registered inside the block (tests, plugins)."""
    register(method)
    try:
        yield method
    finally:
        _REGISTRY.pop(method.name, None)


def _match(value, wanted) -> bool:
    if wanted is None:
        return True
    return value in ((wanted,) if isinstance(wanted, (str, bool)) else tuple(wanted))


def records(stage=None, *, kind=None, default: bool | None = None) -> tuple[Method, ...]:
    """Registered methods in registration order, filtered by stage, kind and default flag
    (``stage`` and ``kind`` may be a name or a tuple of names)."""
    return tuple(
        m
        for m in _REGISTRY.values()
        if _match(m.stage, stage) and _match(m.kind, kind) and _match(m.default, default)
    )


def names(stage=None, *, kind=None, default: bool | None = None) -> tuple[str, ...]:
    """Names of :func:`records` (same filters)."""
    return tuple(m.name for m in records(stage, kind=kind, default=default))


def defaults(stage: str) -> tuple[str, ...]:
    """The methods a stage runs by default (``--methods``; ``--bg-method``, ``--mask-method``
    and the unwrapping have one)."""
    return names(stage, default=True)


def get(name: str, stage=None, *, kind=None) -> Method:
    """The record of ``name``; a ValueError names the choices when there is none (of that
    stage and kind, if given)."""
    m = _REGISTRY.get(name)
    if m is None or not (_match(m.stage, stage) and _match(m.kind, kind)):
        what = " ".join(str(w) for w in (kind, stage) if isinstance(w, str))
        choices = ", ".join(names(stage, kind=kind))
        raise ValueError(f"unknown {what + ' ' if what else ''}method {name!r}; choose from "
                         f"{choices}")  # fmt: skip
    return m


def resolve(name: str):
    """The function that implements method ``name`` (its module is imported now)."""
    module, _, func = get(name).implementation.partition(":")
    return getattr(import_module(module), func)


class _View(Mapping):
    """A live, read-only mapping name -> :class:`Method` over some stages and kinds."""

    def __init__(self, stage=None, kind=None):
        self._stage, self._kind = stage, kind

    def _records(self) -> dict[str, Method]:
        return {m.name: m for m in records(self._stage, kind=self._kind)}

    def __getitem__(self, name: str) -> Method:
        return self._records()[name]

    def __iter__(self):
        return iter(self._records())

    def __len__(self) -> int:
        return len(self._records())

    def __repr__(self) -> str:
        return f"<methods {list(self)}>"


def view(stage=None, *, kind=None) -> Mapping[str, Method]:
    """A live mapping of the records of ``stage`` and ``kind``: later registrations show."""
    return _View(stage, kind)


def references() -> dict[str, str]:
    """Citation key -> full text of every reference of the registered methods."""
    out: dict[str, str] = {}
    for m in _REGISTRY.values():
        for r in (*m.citations, *(c for p in m.parameters for c in p.citations)):
            out.setdefault(r.key, r.text)
    return out


# --------------------------------------------------------------------------------------------
# documentation


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _param_text(p: Parameter) -> str:
    unit = f" {p.unit}" if p.unit and p.default is not None else ""
    text = f"`{p.name}` {_fmt(p.default)}{unit}"
    return f"{text}: {p.description}" if p.description else text


def markdown() -> str:
    """The documentation's page of methods (Markdown), one table per stage."""
    lines = [
        "# Methods and parameters",
        "",
        "Every method qsmprep runs, from its record in `qsmprep.methods` (this page is generated"
        " from the registry when the documentation is built). Parameters are set per method in"
        ' the `--config` file, e.g. `{"tv": {"lam": 0.0005}}`; the defaults are those of the'
        " function named. References: see the reference list.",
    ]
    for stage, heading in STAGES.items():
        recs = records(stage)
        if not recs:
            continue
        lines += ["", f"## {heading}", ""]
        if stage in SECTIONS:
            lines += [
                f"Parameters: the `--config` section `{SECTIONS[stage]}`, whichever method runs.",
                "",
            ]
        lines += [
            "| name | method | function | kind | parameters (defaults) | extra inputs |"
            " references |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in recs:
            kind = m.kind + (" (default)" if m.default else "")
            if m.kind == "dl":
                kind += f"; architecture `{m.arch}`, weights `{m.weights}`"
            params = "<br>".join(_param_text(p) for p in m.parameters) or ""
            refs = ", ".join(r.key for r in m.citations)
            cells = [
                f"`{m.name}`",
                f"{m.label}: {m.description}",
                f"`{m.implementation}`",
                kind,
                params,
                ", ".join(f"`{i}`" for i in m.inputs),
                refs,
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# the methods of qsmprep

_ROMEO = Reference(
    "romeo",
    "Dymerska B, Eckstein K, Bachrata B, et al. Phase unwrapping with a rapid opensource "
    "minimum spanning tree algorithm (ROMEO). Magn Reson Med 2021;85:2294-2308.",
)
_MORPHOLOGY = "then morphological opening, hole filling and brain-scalp separation"
_MASK_PARAMETERS = (
    Parameter("open_mm", 3.0, "mm", "radius of the opening (0: none)"),
    Parameter("erode_mm", 6.0, "mm", "erosion that parts the brain from the scalp (0: none)"),
    Parameter("fill_holes", True, "", "fill the holes the mask encloses"),
)

register(Method(
    "magnitude", "mask", "qsmprep.recon.mask:mask_from_magnitude", "magnitude threshold",
    f"the root-sum-of-squares magnitude over echoes above Otsu's threshold, {_MORPHOLOGY}",
    "by Otsu's threshold of the root-sum-of-squares magnitude over echoes (Otsu, 1979) and "
    "morphological refinement",
    citations=(Reference(
        "otsu",
        "Otsu N. A threshold selection method from gray-level histograms. IEEE Trans Syst Man "
        "Cybern 1979;9:62-66.",
    ),),
    parameters=(
        Parameter("threshold", None, "", "absolute threshold in magnitude units (default: "
                  "factor times Otsu's threshold)"),
        Parameter("factor", 1.0, "", "multiplies Otsu's threshold (> 1 is stricter)"),
        *_MASK_PARAMETERS,
    ),
    default=True,
))  # fmt: skip
register(Method(
    "phase", "mask", "qsmprep.recon.mask:mask_from_phase_quality", "phase-quality threshold",
    f"the ROMEO phase-quality map above a fraction of its Otsu threshold as in QSMxT, "
    f"{_MORPHOLOGY}",
    "by thresholding the ROMEO phase-quality map (Dymerska et al., 2021) as in QSMxT (Stewart "
    "et al., 2022), with morphological refinement",
    citations=(_ROMEO, Reference(
        "qsmxt",
        "Stewart AW, Robinson SD, O'Brien K, et al. QSMxT: Robust masking and artifact "
        "reduction for quantitative susceptibility mapping. Magn Reson Med 2022;87:1289-1300.",
    )),
    parameters=(
        Parameter("threshold", None, "", "absolute quality threshold in [0, 1] (default: "
                  "factor times Otsu's threshold)"),
        Parameter("factor", 0.7, "", "multiplies Otsu's threshold of the quality map"),
        *_MASK_PARAMETERS,
    ),
    inputs=("phase", "echo_times"),
))  # fmt: skip

register(Method(
    "quality", "unwrap", "qsmprep.recon.unwrap.multi_echo:unwrap_echoes_quality", "ROMEO",
    "quality-guided region growing in the first echo, then temporal unwrapping of each later "
    "echo against the preceding one",
    "by quality-guided region growing (ROMEO; Dymerska et al., 2021) in the first echo and "
    "temporally in the later echoes",
    one_echo_summary="by quality-guided region growing (ROMEO; Dymerska et al., 2021)",
    citations=(_ROMEO,), default=True,
))  # fmt: skip
register(Method(
    "laplacian", "unwrap", "qsmprep.recon.unwrap.multi_echo:unwrap_echoes_laplacian", "Laplacian",
    "a Poisson solve of each echo's wrapped-phase Laplacian, the 2-pi multiple of each echo's "
    "constant then set against the preceding echo",
    "echo by echo with the Laplacian method (Schofield and Zhu, 2003)",
    one_echo_summary="with the Laplacian method (Schofield and Zhu, 2003)",
    citations=(Reference(
        "laplacian_unwrap",
        "Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric "
        "applications. Opt Lett 2003;28:1194-1196.",
    ),),
))  # fmt: skip

_SHARP = Reference(
    "sharp",
    "Schweser F, Deistung A, Lehr BW, Reichenbach JR. Quantitative imaging of intrinsic "
    "magnetic tissue properties using MRI signal phase: an approach to in vivo brain iron "
    "metabolism? NeuroImage 2011;54:2789-2807.",
)
_QSMNET = Reference(
    "qsmnet",
    "Yoon J, Gong E, Chatnuntawech I, et al. Quantitative susceptibility mapping using deep "
    "neural network: QSMnet. NeuroImage 2018;179:199-206.",
)
_PAD = "zero-padding of the mask's bounding box per axis (default 20 mm)"
_CG_TOL = "CG stop: relative residual"

register(Method(
    "resharp", "background", "qsmprep.recon.background.smv:resharp", "RESHARP",
    "SHARP with Tikhonov regularization", "RESHARP (Sun and Wilman, 2014)",
    citations=(Reference(
        "resharp",
        "Sun H, Wilman AH. Background field removal using spherical mean value filtering and "
        "Tikhonov regularization. Magn Reson Med 2014;71:1151-1157.",
    ),),
    parameters=(
        Parameter("radius", 6.0, "mm", "SMV kernel radius", key=True),
        Parameter("alpha", 1e-4, "", "Tikhonov weight (unitless)", key=True),
        Parameter("tol", 3e-3, "", _CG_TOL),
        Parameter("max_iter", 300, "", "CG iteration limit"),
    ),
))  # fmt: skip
register(Method(
    "vsharp", "background", "qsmprep.recon.background.smv:vsharp", "V-SHARP",
    "SHARP with variable spherical kernel radii", "V-SHARP (Wu et al., 2012)",
    citations=(Reference(
        "vsharp",
        "Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed "
        "sensing. Magn Reson Med 2012;67:137-147.",
    ), _SHARP),
    parameters=(
        Parameter("radii", None, "mm", "kernel radii: 12 mm down to twice the largest voxel "
                  "size in steps of one voxel", key=True),
        Parameter("threshold", 0.05, "", "truncation of the deconvolution (unitless)", key=True),
    ),
))  # fmt: skip
register(Method(
    "sharp", "background", "qsmprep.recon.background.smv:sharp", "SHARP",
    "sophisticated harmonic artifact reduction for phase data", "SHARP (Schweser et al., 2011)",
    citations=(_SHARP,),
    parameters=(
        Parameter("radius", 6.0, "mm", "SMV kernel radius", key=True),
        Parameter("threshold", 0.05, "", "truncation of the deconvolution (unitless)", key=True),
    ),
))  # fmt: skip
register(Method(
    "pdf", "background", "qsmprep.recon.background.projection:pdf", "PDF",
    "projection onto dipole fields",
    "projection onto dipole fields (PDF; Liu et al., 2011)",
    citations=(Reference(
        "pdf",
        "Liu T, Khalidov I, de Rochefort L, et al. A novel background field removal method for "
        "MRI using projection onto dipole fields (PDF). NMR Biomed 2011;24:1129-1136.",
    ),),
    parameters=(
        Parameter("tol", 3e-3, "", "CGLS stop: relative normal-equation residual", key=True),
        Parameter("max_iter", 50, "", "CGLS iteration limit", key=True),
        Parameter("pad", None, "voxels", "zero-padding of the mask's bounding box (default "
                  "15 mm)"),
        Parameter("erode", 0, "voxels", "layers peeled off the mask before fitting"),
    ),
    inputs=("b0_dir",), keeps_mask=True,
))  # fmt: skip
register(Method(
    "lbv", "background", "qsmprep.recon.background.boundary_value:lbv", "LBV",
    "Laplacian boundary value background removal",
    "the Laplacian boundary value method (LBV; Zhou et al., 2014)",
    citations=(Reference(
        "lbv",
        "Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the "
        "Laplacian boundary value problem. NMR Biomed 2014;27:312-319.",
    ),),
    parameters=(
        Parameter("tol", 1e-6, "", "CG stop: relative residual of the Poisson system", key=True),
        Parameter("max_iter", 3000, "", "CG iteration limit"),
        Parameter("peel", 0.0, "mm", "distance from the mask edge within which the result is "
                  "discarded", key=True),
    ),
    keeps_mask=True, default=True,
))  # fmt: skip

_TFI = Reference(
    "tfi",
    "Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. Preconditioned total field inversion (TFI) "
    "method for quantitative susceptibility mapping. Magn Reson Med 2017;78:303-315.",
)
"""Total field inversion (the TFI inversion and TFI's background)."""

register(Method(
    "tfibg", "background", "qsmprep.recon.background.total_field:tfibg", "TFI background",
    "the field of the sources a total field inversion places outside the brain",
    "subtracting the field of the sources that a preconditioned total field inversion places "
    "outside the brain (TFI; Liu et al., 2017)",
    citations=(_TFI,),
    parameters=(
        Parameter("lam", None, "", "TFI's data-term weight for ppm fields (default with a "
                  "noise map \"noise\": 4 / sigma, sigma the median noise std in ppm)", key=True),
        Parameter("p_b", 30.0, "", "preconditioner of the sources outside the brain", key=True),
        Parameter("pad", None, "voxels", "margin of sources around the mask's bounding box per "
                  "axis (default 12 mm)"),
        Parameter("delta_te", 0.005, "s", "echo spacing (default: from the echo times)"),
        Parameter("b0", 3.0, "T", "field strength (default: the acquisition's)"),
        Parameter("max_iter", 10, "", "Gauss-Newton iteration limit", key=True),
        Parameter("tol", 0.1, "", "stop at this relative update"),
        Parameter("cg_tol", 0.01, "", "inner CG relative residual"),
        Parameter("cg_max_iter", 100, "", "inner CG iteration limit"),
        Parameter("fill", True, "", "where the field is unreliable, the local field is the "
                  "field of TFI's sources inside the brain (else left out of the local mask)"),
    ),
    inputs=("magnitude", "noise_std", "data_mask", "delta_te", "b0", "b0_dir"),
))  # fmt: skip

register(Method(
    "tkd", "inversion", "qsmprep.recon.inversion.direct:tkd", "TKD",
    "truncated k-space division", "truncated k-space division (TKD; Shmueli et al., 2009)",
    citations=(Reference(
        "tkd",
        "Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH. Magnetic "
        "susceptibility mapping of brain tissue in vivo using MRI phase data. Magn Reson Med "
        "2009;62:1510-1522.",
    ),),
    parameters=(
        Parameter("threshold", 0.19, "", "truncation level of |D|, in (0, 2/3)", key=True),
        Parameter("correct", False, "", "divide by PSF(0) (Schweser correction)", key=True,
                  citations=(Reference(
                      "tkd_correction",
                      "Schweser F, Deistung A, Sommer K, Reichenbach JR. Toward online "
                      "reconstruction of quantitative susceptibility maps: superfast dipole "
                      "inversion. Magn Reson Med 2013;69:1582-1594.",
                  ),)),
        Parameter("pad", None, "voxels", _PAD),
    ),
    default=True,
))  # fmt: skip
register(Method(
    "tsvd", "inversion", "qsmprep.recon.inversion.direct:tsvd", "TSVD",
    "k-space division with the ill-conditioned cone set to zero",
    "k-space division with the ill-conditioned cone set to zero (TSVD; Wharton et al., 2010)",
    citations=(Reference(
        "tsvd",
        "Wharton S, Schaefer A, Bowtell R. Susceptibility mapping in the human brain using "
        "threshold-based k-space division. Magn Reson Med 2010;63:1292-1304.",
    ),),
    parameters=(
        Parameter("threshold", 0.19, "", "truncation level of |D|, in (0, 2/3)", key=True),
        Parameter("correct", False, "", "divide by PSF(0)"),
        Parameter("pad", None, "voxels", _PAD),
    ),
))  # fmt: skip
register(Method(
    "l2", "inversion", "qsmprep.recon.inversion.direct:l2", "closed-form L2",
    "Tikhonov-regularized inversion",
    "closed-form L2-regularised inversion (Bilgic et al., 2014a)",
    citations=(Reference(
        "l2",
        "Bilgic B, Chatnuntawech I, Fan AP, et al. Fast image reconstruction with "
        "L2-regularization. J Magn Reson Imaging 2014;40:181-191.",
    ),),
    parameters=(
        Parameter("lam", None, "", "regularisation weight (>= 0); default per reg: 0.04 mm^2 "
                  "(gradient), 0.015 (identity), 0.1 mm^4 (laplacian)", key=True),
        Parameter("reg", "gradient", "", "regulariser: gradient, identity or laplacian",
                  key=True),
        Parameter("pad", None, "voxels", _PAD),
    ),
    default=True,
))  # fmt: skip
register(Method(
    "tv", "inversion", "qsmprep.recon.inversion.tv:tv", "TV",
    "total-variation regularized inversion solved by ADMM",
    "total-variation (TV) regularised inversion solved by ADMM (Bilgic et al., 2014b; Milovic "
    "et al., 2018)",
    citations=(Reference(
        "tv",
        "Bilgic B, Fan AP, Polimeni JR, et al. Fast quantitative susceptibility mapping with "
        "L1-regularization and automatic parameter selection. Magn Reson Med "
        "2014;72:1444-1459.",
    ), Reference(
        "fansi",
        "Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear "
        "susceptibility inversion with variational regularization. Magn Reson Med "
        "2018;80:814-821.",
    )),
    parameters=(
        Parameter("lam", 2e-4, "", "TV weight per voxel (the TV term is lam h ||grad chi||_1, "
                  "h the mean voxel size in mm)", key=True),
        Parameter("max_iter", 250, "", "ADMM iteration limit", key=True),
        Parameter("tol", 2e-3, "", "stop at this relative change of chi", key=True),
        Parameter("init", "tkd", "", "ADMM's starting point: the TKD map (tkd) or zero",
                  key=True),
        Parameter("rho", None, "", "ADMM penalty of the gradient split (default 450 lam h)"),
        Parameter("mu", 0.1, "", "ADMM penalty of the data split"),
        Parameter("data_mask", True, "", "count the data term over the mask only"),
        Parameter("relax", 1.8, "", "ADMM over-relaxation, in (0, 2)"),
        Parameter("pad", None, "voxels", _PAD),
    ),
    inputs=("weight",), default=True, whole_brain=True, long_running=True,
))  # fmt: skip
_MEDI2012 = Reference(
    "medi2012",
    "Liu J, Liu T, de Rochefort L, et al. Morphology enabled dipole inversion for "
    "quantitative susceptibility mapping using structural consistency between the "
    "magnitude image and the susceptibility map. NeuroImage 2012;59:2560-2568.",
)
"""MEDI's edge mask (MEDI and TFI)."""

register(Method(
    "medi", "inversion", "qsmprep.recon.inversion.medi:medi", "MEDI",
    "morphology enabled dipole inversion, nonlinear data term",
    "morphology enabled dipole inversion with a nonlinear data term (MEDI; Liu et al., "
    "2011, 2012, 2013)",
    citations=(Reference(
        "medi2011",
        "Liu T, Liu J, de Rochefort L, et al. Morphology enabled dipole inversion (MEDI) from "
        "a single-angle acquisition: comparison with COSMOS in human brain imaging. Magn Reson "
        "Med 2011;66:777-783.",
    ), _MEDI2012, Reference(
        "medi2013",
        "Liu T, Wisnieff C, Lou M, Chen W, Spincemaille P, Wang Y. Nonlinear formulation of "
        "the magnetic field to source relationship for robust quantitative susceptibility "
        "mapping. Magn Reson Med 2013;69:467-476.",
    )),
    parameters=(
        Parameter("lam", None, "", "data-term weight for ppm fields (default 1000 c, c the "
                  "radians per ppm over delta_te); \"noise\": 4 / sigma, sigma the field's "
                  "median noise std in ppm, at most 1000 c", key=True),
        Parameter("delta_te", 0.005, "s", "echo spacing (default: from the echo times)"),
        Parameter("b0", 3.0, "T", "field strength (default: the acquisition's)"),
        Parameter("percentage", 0.9, "", "edge fraction of the magnitude gradient mask",
                  key=True),
        Parameter("lambda_csf", None, "", "MEDI+0 CSF-uniformity weight (default 100 c; with "
                  "a CSF mask only)", key=True, citations=(Reference(
                      "medi0",
                      "Liu Z, Spincemaille P, Yao Y, Zhang Y, Wang Y. MEDI+0: Morphology "
                      "enabled dipole inversion with automatic uniform cerebrospinal fluid zero "
                      "reference for quantitative susceptibility mapping. Magn Reson Med "
                      "2018;79:2795-2803.",
                  ),)),
        Parameter("max_iter", 10, "", "Gauss-Newton iteration limit", key=True),
        Parameter("tol", 0.1, "", "stop at this relative update"),
        Parameter("cg_tol", 0.01, "", "inner CG relative residual"),
        Parameter("cg_max_iter", 100, "", "inner CG iteration limit"),
        Parameter("pad", 0, "voxels", "zero-padding of the mask's bounding box per axis"),
    ),
    inputs=("magnitude", "noise_std", "data_mask", "delta_te", "b0"), default=True,
    whole_brain=True, long_running=True,
))  # fmt: skip
register(Method(
    "tfi", "inversion", "qsmprep.recon.inversion.tfi:tfi", "TFI",
    "preconditioned total field inversion, no background removal",
    "preconditioned total field inversion of the total field, without background field "
    "removal (TFI; Liu et al., 2017), with MEDI's edge mask",
    citations=(_TFI, _MEDI2012),
    parameters=(
        Parameter("lam", None, "", "data-term weight for ppm fields (default with a noise map "
                  "\"noise\": 4 / sigma, sigma the field's median noise std in ppm, at most "
                  "1000 c; else 1000 c)", key=True),
        Parameter("p_b", 30.0, "", "preconditioner of the background sources outside the "
                  "brain mask", key=True),
        Parameter("pad", None, "voxels", "margin of background sources around the mask's "
                  "bounding box per axis (default 12 mm)"),
        Parameter("delta_te", 0.005, "s", "echo spacing (default: from the echo times)"),
        Parameter("b0", 3.0, "T", "field strength (default: the acquisition's)"),
        Parameter("percentage", 0.9, "", "edge fraction of the magnitude gradient mask"),
        Parameter("max_iter", 10, "", "Gauss-Newton iteration limit", key=True),
        Parameter("tol", 0.1, "", "stop at this relative update"),
        Parameter("cg_tol", 0.01, "", "inner CG relative residual"),
        Parameter("cg_max_iter", 100, "", "inner CG iteration limit"),
    ),
    inputs=("magnitude", "noise_std", "data_mask", "delta_te", "b0"), whole_brain=True,
    field="total", long_running=True,
))  # fmt: skip
register(Method(
    "cosmos", "inversion", "qsmprep.recon.inversion.cosmos:cosmos", "COSMOS",
    "calculation of susceptibility through multiple orientation sampling",
    "COSMOS (Liu et al., 2009)",
    citations=(Reference(
        "cosmos",
        "Liu T, Spincemaille P, de Rochefort L, Kressler B, Wang Y. Calculation of "
        "susceptibility through multiple orientation sampling (COSMOS): a method for "
        "conditioning the inverse problem from measured magnetic field map to susceptibility "
        "source image in MRI. Magn Reson Med 2009;61:196-204.",
    ),),
    parameters=(
        Parameter("eps", 0.01, "", "floor of sum_n D_n^2 of the closed form"),
        Parameter("tol", 1e-3, "", "CG stop: relative residual of the normal equations"),
        Parameter("max_iter", 50, "", "CG iteration limit (0: the closed form alone)"),
        Parameter("pad", None, "voxels", _PAD),
    ),
    kind="multi-orientation",
))  # fmt: skip

_DL_PARAMETERS = (
    Parameter("model", None, "", "a registered model instead of the method's weights", key=True),
    Parameter("weights", None, "", "a checkpoint file instead of the registry"),
    Parameter("tile_shape", None, "voxels", "tiles of this size (default: one pass)"),
    Parameter("overlap", 16, "voxels", "overlap of the tiles"),
)
_DL = {"kind": "dl", "parameters": _DL_PARAMETERS}
register(Method(
    "unet", "inversion", "qsmprep.dl.invert:dl_invert", "U-Net",
    "a 3D U-Net trained on synthetic data",
    "a 3D U-Net trained on synthetic data (Yoon et al., 2018; Bollmann et al., 2019)",
    citations=(_QSMNET, Reference(
        "deepqsm",
        "Bollmann S, Rasmussen KGB, Kristensen M, et al. DeepQSM - using deep learning to "
        "solve the dipole inversion for quantitative susceptibility mapping. NeuroImage "
        "2019;195:373-383.",
    )),
    arch="unet", weights="unet", **_DL,
))  # fmt: skip
register(Method(
    "adaptive", "inversion", "qsmprep.dl.invert:dl_invert", "adaptive-convolution U-Net",
    "first-layer filters generated from voxel size and B0 direction, transfer-learned",
    "an adaptive-convolution U-Net whose first-layer filters are generated from the voxel size "
    "and B0 direction (Kang et al., 2017), pre-trained on synthetic data and transfer-learned",
    citations=(Reference(
        "adaptiveconv",
        "Kang D, Dhar D, Chan AB. Incorporating side information by adaptive convolution. Adv "
        "Neural Inf Process Syst 2017;30:3867-3877.",
    ), _QSMNET),
    arch="adaptive", weights="adaptive", **_DL,
))  # fmt: skip
register(Method(
    "dsbn", "inversion", "qsmprep.dl.invert:dl_invert", "QSMInvNet+",
    "a U-Net with domain-specific batch normalization and a data-consistency loss on "
    "unlabelled scans",
    "a U-Net with domain-specific batch normalization trained on synthetic data and unlabelled "
    "scans with a data-consistency loss (QSMInvNet+; Chang et al., 2019)",
    citations=(Reference(
        "dsbn",
        "Chang WG, You T, Seo S, Kwak S, Han B. Domain-specific batch normalization for "
        "unsupervised domain adaptation. Proc IEEE/CVF CVPR 2019:7354-7362.",
    ), _QSMNET),
    arch="dsbn", weights="dsbn", **_DL,
))  # fmt: skip
register(Method(
    "dcfinetune", "inversion", "qsmprep.dl.invert:dl_invert", "QSMInvNet",
    "a U-Net fine-tuned on scans with a data-consistency loss",
    "a U-Net trained on synthetic data and fine-tuned on scans with a data-consistency loss "
    "(QSMInvNet)",
    citations=(_QSMNET,), arch="unet", weights="dcfinetune", **_DL,
))  # fmt: skip
register(Method(
    "unsup", "inversion", "qsmprep.dl.invert:dl_invert", "uQSM-style U-Net",
    "trained with a data-consistency loss only",
    "a U-Net trained with a data-consistency loss only (uQSM-style)",
    citations=(_QSMNET,), arch="unet", weights="unsup", **_DL,
))  # fmt: skip

register(Method(
    "arlo", "r2star", "qsmprep.recon.r2star:r2star_arlo", "ARLO",
    "by auto-regression on linear operations (ARLO), a closed form for equally spaced echoes",
    "by auto-regression on linear operations (ARLO; Pei et al., 2015)",
    citations=(Reference(
        "arlo",
        "Pei M, Nguyen TD, Thimmappa ND, et al. Algorithm for fast monoexponential fitting "
        "based on Auto-Regression on Linear Operations (ARLO) of data. Magn Reson Med "
        "2015;73:843-850.",
    ),),
))  # fmt: skip
register(Method(
    "nlls", "r2star", "qsmprep.recon.r2star:r2star_nlls", "NLLS",
    "by nonlinear least squares (Levenberg-Marquardt from a log-linear start)",
    "by nonlinear least squares (Levenberg-Marquardt), started from a log-linear fit",
    parameters=(Parameter("max_iter", 30, "", "Levenberg-Marquardt iteration limit"),),
))  # fmt: skip
register(Method(
    "loglinear", "r2star", "qsmprep.recon.r2star:r2star_loglinear", "log-linear",
    "by a magnitude-weighted linear fit of the log signal",
    "by a magnitude-weighted linear fit of the log signal",
))  # fmt: skip
