"""Per-stage accuracy of the field chain on datasets with ground truth: ``qsmprep-bench chain``.

For each dataset the BIDS App runs as a user runs it (participant level, chosen methods and
background removal); then every acquisition is scored against the simulator's ground truth in
``derivatives/groundtruth`` (``*_Chimap``, ``*_desc-brain_mask``, ``*_desc-local_fieldmap``,
``*_desc-total_fieldmap``; per acquisition or per subject), the layout of the development sets.

Per acquisition:

- brain mask: Dice against the true brain mask; the share of the true brain inside the
  pipeline's ``desc-local_mask`` ("kept") and inside each Chimap's non-zero voxels;
- total field (Hz): NRMSE (%) and regression slope against the truth inside both brain masks;
  beside it the same for the data's own field, the echo-pair estimate
  (:func:`echo_pair_field`: the phase of the summed products of successive echoes, no
  unwrapping, no fit, its 2 pi ambiguities resolved with the true field); the fit penalty is
  the App's total-field NRMSE / the echo-pair's over the voxels the chain uses (both brain
  masks, less the unreliable ones, ``desc-reliable_mask``): near 1 when unwrapping and the echo
  fit add no error of their own there, whatever the data's own errors against the truth
  (partial volume, noise) are. Local field (Hz): NRMSE and slope inside ``desc-local_mask`` and
  the true brain mask;
- each method: NRMSE / HFEN / XSIM over the *true* brain mask (every voxel counts, as in the QSM
  challenges: a voxel left at zero is an error), end to end; the same method run on the true
  local field in the true brain mask ("oracle"); and on the noise-matched oracle field, the true
  local field plus white Gaussian noise drawn with the pipeline's own noise map
  (``desc-noise_fieldmap``). The chain penalty is end-to-end NRMSE / noise-matched NRMSE.
- with ``background`` (``--background-oracle``): the App's background removal on the *true
  total field* (noise-free, the true brain mask, every voxel reliable, the same parameters and
  cross-check as the App), its local field scored against the truth, and each method run on
  that local field: what the background removal alone costs, without noise, unwrapping, echo
  fit or brain mask. The background penalty is that NRMSE / the method's NRMSE on the true
  local field.

The oracle runs use the method functions of :mod:`qsmprep.recon.inversion` with the App's
parameters (``--config`` sections), so they differ from the App's only in their input field and
mask. Fields are compared after de-meaning (the field mean is arbitrary).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmprep.methods import get, names, resolve
from qsmprep.nifti import load_data

__all__ = [
    "ChainScore",
    "echo_pair_field",
    "format_chain_table",
    "run_chain",
    "score_acquisition",
]


@dataclass
class ChainScore:
    """Scores of one acquisition (see the module docstring)."""

    dataset: str
    acquisition: str
    dice: float
    kept: float
    total_nrmse: float
    total_slope: float
    local_nrmse: float
    local_slope: float
    oracle_field_nrmse: float
    methods: dict
    background: dict | None = None
    echo_pair_nrmse: float | None = None  # the data's own total field (module doc)
    echo_pair_slope: float | None = None
    fit_penalty: float | None = None

    def to_dict(self) -> dict:
        return dict(vars(self))


def _demeaned_fit(est: np.ndarray, ref: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    """(NRMSE %, slope of est on ref) of de-meaned values inside ``m``."""
    e = est[m].astype(np.float64)
    r = ref[m].astype(np.float64)
    e -= e.mean()
    r -= r.mean()
    rr = float(r @ r)
    return 100.0 * float(np.linalg.norm(e - r)) / math.sqrt(rr), float(e @ r) / rr


def _truth_file(gt_anat: Path, prefix: str, sub: str, suffix: str) -> Path:
    """The acquisition's ground-truth file, else the subject's (one grid for all of them)."""
    for p in (gt_anat / f"{prefix}_{suffix}", gt_anat / f"{sub}_{suffix}"):
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"no ground truth {prefix}_{suffix} or {sub}_{suffix} in {gt_anat}: the chain benchmark"
        " needs a dataset with derivatives/groundtruth (e.g. ../shared/data/qsmdev)"
    )


def echo_pair_field(magnitude, phase, echo_times, reference_hz, mask) -> np.ndarray | None:
    """The data's own total field (Hz): the echo-pair estimate, unwrapped with a reference.

    ``angle(sum_n s_{n+1} conj(s_n)) / (2 pi dTE)`` over successive echoes ``s_n = m_n
    exp(i phi_n)`` (the first pair alone when the echo spacing is not uniform): no spatial
    unwrapping, no phase offset (it cancels), no fit. Its ``1 / dTE`` ambiguity is resolved
    with ``reference_hz`` (the true total field, whose mean is arbitrary: their circular mean
    difference inside ``mask`` is matched first). None with fewer than two echoes.

    Parameters
    ----------
    magnitude, phase : (X, Y, Z, E) arrays
        Echoes on the last axis; phase in radians.
    echo_times : E floats
        Seconds.
    reference_hz, mask : (X, Y, Z) arrays
    """
    te = np.asarray(echo_times, dtype=np.float64)
    if te.size < 2:
        return None
    steps = np.diff(te)
    pairs = range(te.size - 1) if np.allclose(steps, steps[0], rtol=1e-3) else range(1)
    s = np.asarray(magnitude, np.float64) * np.exp(1j * np.asarray(phase, np.float64))
    h = sum(s[..., n + 1] * np.conj(s[..., n]) for n in pairs)
    dte = float(steps[0])
    f = np.angle(h) / (2.0 * math.pi * dte)
    m = np.asarray(mask, bool)
    ref = np.asarray(reference_hz, np.float64)
    shift = np.angle(np.sum(np.exp(2j * math.pi * (f[m] - ref[m]) * dte))) / (2.0 * math.pi * dte)
    target = ref + shift
    return f + np.round((target - f) * dte) / dte


def _echo_pair(bids: Path, deriv: Path, sources: list[str], t_total, mask):
    """:func:`echo_pair_field` of the echo files listed in a sidecar (None without phase)."""
    from qsmprep.bids.images import detect_phase_units, load_phase

    mags = [bids / p for p in sources if "part-mag" in p]
    phases = [bids / p for p in sources if "part-phase" in p]
    if len(phases) < 2 or len(mags) != len(phases):
        return None
    te = []
    for p in phases:
        side = p.with_name(p.name.replace(".nii.gz", ".json").replace(".nii", ".json"))
        meta = json.loads(side.read_text()) if side.is_file() else {}
        if "EchoTime" not in meta:
            return None
        te.append(float(meta["EchoTime"]))
    settings = deriv / "qsmprep_settings.json"
    sign = json.loads(settings.read_text()).get("phase_sign", 1) if settings.is_file() else 1
    phase = np.stack([load_phase(p, detect_phase_units(p), int(sign)) for p in phases], -1)
    mag = np.stack([load_data(p) for p in mags], -1)
    return echo_pair_field(mag, phase, te, t_total, mask)


def _magnitude(bids: Path, sources: list[str]) -> np.ndarray | None:
    """Root sum of squares over the echoes of the magnitude files listed in a sidecar."""
    from qsmprep.recon.mask import combine_magnitude

    mags = [bids / s for s in sources if "part-mag" in s]
    if not mags:
        return None
    return combine_magnitude(np.stack([load_data(p) for p in mags], axis=-1))


def _oracle_inversion(
    method, field_ppm, mask, vs, b0_dir, params, *, meta, bids, noise_hz, data_mask=None
):
    """``method`` on a given field and mask with the App's parameters and extra inputs
    (``data_mask``: where the field is known, for a method that takes one; one that does not
    gets the field in ``mask & data_mask``, as the App gives it the local mask)."""
    from qsmprep.recon.kernels import hz_to_ppm

    func, needs = resolve(method), get(method).inputs
    params = dict(params)
    extra = {}
    te = list(meta.get("EchoTime") or [])
    if "delta_te" in needs and te:
        from qsmprep.recon.inversion.medi import delta_te_of

        params.setdefault("delta_te", delta_te_of(te))
    if "b0" in needs:
        params.setdefault("b0", float(meta["B0"]))
    if "magnitude" in needs:
        extra["magnitude"] = _magnitude(bids, meta.get("Sources", []))
    if "noise_std" in needs:  # in ppm, as the App gives it (lam="noise" reads its level)
        extra["noise_std"] = hz_to_ppm(noise_hz, float(meta["B0"]))
    if data_mask is not None:
        if "data_mask" in needs:
            extra["data_mask"] = data_mask
        else:
            mask = mask & data_mask
    return func(field_ppm, mask, vs, b0_dir=b0_dir, **extra, **params)


def _background_oracle(method, params, t_total, t_mask, vs, b0_dir, *, meta, bids, noise_hz):
    """The App's background removal on the true total field: (local Hz, local mask, check)."""
    from qsmprep.recon import chain
    from qsmprep.recon.inversion.medi import delta_te_of

    te = list(meta.get("EchoTime") or [])
    inputs = {
        "magnitude": _magnitude(bids, meta.get("Sources", [])),
        "noise_std": noise_hz,
        "data_mask": t_mask,
        "b0": float(meta["B0"]),
    }
    if te:
        inputs["delta_te"] = delta_te_of(te)
    return chain.remove_background(
        np.where(t_mask, t_total, 0.0), t_mask, vs, method=method, params=params,
        b0_dir=b0_dir, brain_mask=t_mask, inputs=inputs,
    )  # fmt: skip


def score_acquisition(
    bids: Path,
    deriv: Path,
    prefix: str,
    methods: list[str],
    method_params: dict | None = None,
    *,
    seed: int = 0,
    background: str | None = None,
    background_params: dict | None = None,
) -> ChainScore:
    """Score one acquisition (file prefix ``sub-XX[_ses-..][_acq-..]``) of an App output
    (``background``: the App's background method, for the background oracle; module doc)."""
    from qsmprep.metrics import evaluate
    from qsmprep.recon.kernels import b0_dir_from_affine, hz_to_ppm

    method_params = method_params or {}
    sub = prefix.split("_")[0]
    anat = deriv / sub / "anat"
    gt = bids / "derivatives" / "groundtruth" / sub / "anat"
    t_mask = load_data(_truth_file(gt, prefix, sub, "desc-brain_mask.nii.gz")) > 0
    t_chi = load_data(_truth_file(gt, prefix, sub, "Chimap.nii.gz"))
    t_local = load_data(_truth_file(gt, prefix, sub, "desc-local_fieldmap.nii.gz"))
    t_total = load_data(_truth_file(gt, prefix, sub, "desc-total_fieldmap.nii.gz"))
    brain = load_data(anat / f"{prefix}_desc-brain_mask.nii.gz") > 0
    local_mask = load_data(anat / f"{prefix}_desc-local_mask.nii.gz") > 0
    local_img = nib.load(anat / f"{prefix}_desc-local_fieldmap.nii.gz")
    local = np.asarray(local_img.dataobj, dtype=np.float32)
    total = load_data(anat / f"{prefix}_desc-total_fieldmap.nii.gz")
    noise = load_data(anat / f"{prefix}_desc-noise_fieldmap.nii.gz")
    if t_mask.shape != brain.shape:
        raise ValueError(
            f"ground truth of {prefix} is on a {t_mask.shape} grid, the output on {brain.shape}"
        )
    vs = tuple(float(v) for v in local_img.header.get_zooms()[:3])
    b0_dir = b0_dir_from_affine(local_img.affine)

    n_true = int(t_mask.sum())
    dice = 2.0 * float((brain & t_mask).sum()) / float(brain.sum() + n_true)
    kept = float((local_mask & t_mask).sum()) / n_true
    tot = _demeaned_fit(total, t_total, brain & t_mask)
    total_meta = anat / f"{prefix}_desc-total_fieldmap.json"
    sources = json.loads(total_meta.read_text()).get("Sources", []) if total_meta.is_file() else []
    pair = _echo_pair(bids, deriv, sources, t_total, brain & t_mask)
    pair_fit, fit_penalty = (None, None), None
    if pair is not None:
        pair_fit = _demeaned_fit(pair, t_total, brain & t_mask)
        used = brain & t_mask
        rel_file = anat / f"{prefix}_desc-reliable_mask.nii.gz"
        if rel_file.is_file():
            used = used & (load_data(rel_file) > 0)
        fit_penalty = (
            _demeaned_fit(total, t_total, used)[0] / _demeaned_fit(pair, t_total, used)[0]
        )
    loc = _demeaned_fit(local, t_local, local_mask & t_mask)
    # noise-matched oracle field: the pipeline's noise map inside its brain mask, its median
    # where the true brain extends beyond it
    inside = brain & (noise > 0) & np.isfinite(noise)
    sd = np.where(inside, noise, float(np.median(noise[inside])) if inside.any() else 0.0)
    rng = np.random.default_rng(seed)
    noisy = (t_local + sd * rng.standard_normal(t_local.shape)).astype(np.float32)
    oracle_field = _demeaned_fit(noisy, t_local, t_mask)[0]

    bg = None
    if background:
        meta = json.loads((anat / f"{prefix}_desc-local_fieldmap.json").read_text())
        bg_local, bg_mask, check = _background_oracle(
            background, background_params, t_total, t_mask, vs, b0_dir,
            meta=meta, bids=bids, noise_hz=sd,
        )  # fmt: skip
        bg_fit = _demeaned_fit(bg_local, t_local, bg_mask & t_mask)
        bg = {
            "method": check["method"],
            "kept": float((bg_mask & t_mask).sum()) / n_true,
            "local_nrmse": bg_fit[0],
            "local_slope": bg_fit[1],
        }

    scores: dict = {}
    for method in methods:
        f = anat / f"{prefix}_desc-{method}_Chimap.nii.gz"
        if not f.is_file():
            continue
        meta = json.loads(f.with_name(f.name.replace(".nii.gz", ".json")).read_text())
        chi = load_data(f)
        row = {"covered": float((t_mask & (chi != 0)).sum()) / n_true}
        row["end_to_end"] = _metrics(evaluate(chi, t_chi, t_mask))
        if method in names("inversion", kind="classical"):
            b0 = float(meta["B0"])
            for key, field_hz in (("oracle", t_local), ("noise_oracle", noisy)):
                est = _oracle_inversion(
                    method, hz_to_ppm(field_hz, b0), t_mask, vs, b0_dir,
                    method_params.get(method, {}), meta=meta, bids=bids, noise_hz=sd,
                )  # fmt: skip
                row[key] = _metrics(evaluate(est, t_chi, t_mask))
            row["chain_penalty"] = row["end_to_end"]["nrmse"] / row["noise_oracle"]["nrmse"]
            if bg is not None:
                est = _oracle_inversion(
                    method, hz_to_ppm(bg_local, b0), t_mask, vs, b0_dir,
                    method_params.get(method, {}), meta=meta, bids=bids, noise_hz=sd,
                    data_mask=bg_mask,
                )  # fmt: skip
                row["background_oracle"] = _metrics(evaluate(est, t_chi, t_mask))
                row["background_penalty"] = (
                    row["background_oracle"]["nrmse"] / row["oracle"]["nrmse"]
                )
        scores[method] = row
    return ChainScore(
        dataset=bids.name,
        acquisition=prefix,
        dice=dice,
        kept=kept,
        total_nrmse=tot[0],
        total_slope=tot[1],
        local_nrmse=loc[0],
        local_slope=loc[1],
        oracle_field_nrmse=oracle_field,
        methods=scores,
        background=bg,
        echo_pair_nrmse=pair_fit[0],
        echo_pair_slope=pair_fit[1],
        fit_penalty=fit_penalty,
    )


def _metrics(e: dict) -> dict:
    return {k: float(e[k]) for k in ("nrmse", "hfen", "xsim", "slope")}


def run_chain(
    datasets,
    out: Path,
    *,
    methods=("tkd", "tv", "medi"),
    bg_method: str | None = None,
    method_params: dict | None = None,
    nprocs: int = 2,
    seed: int = 0,
    dl_adapt: bool = False,
    background_oracle: bool = False,
    log=print,
) -> list[ChainScore]:
    """Run the App on each dataset into ``out/<name>`` and score every acquisition
    (``dl_adapt``: as ``qsmprep --dl-adapt``, the adaptable networks adapted to each dataset;
    ``background_oracle``: also the App's background removal on the true total field)."""
    from qsmprep.app import run_participant
    from qsmprep.config import Settings

    out = Path(out).absolute()
    results: list[ChainScore] = []
    for ds in datasets:
        ds = Path(ds).absolute()
        if not (ds / "derivatives" / "groundtruth").is_dir():
            raise ValueError(
                f"{ds} has no derivatives/groundtruth: qsmprep-bench chain scores against a"
                " simulator's ground truth (e.g. ../shared/data/qsmdev)"
            )
        kw = {"bg_method": bg_method} if bg_method else {}
        settings = Settings(
            bids_dir=ds,
            output_dir=out / ds.name / "derivatives" / "qsmprep",
            work_dir=out / ds.name / "work",
            methods=list(methods),
            method_params=dict(method_params or {}),
            nprocs=nprocs,
            dl_adapt=dl_adapt,
            **kw,
        )
        log(f"# {ds.name}: qsmprep participant, methods {' '.join(methods)}, "
            f"background {settings.bg_method}" + (", --dl-adapt" if dl_adapt else ""))  # fmt: skip
        rc = run_participant(settings)
        if rc != 0:
            log(f"# {ds.name}: some acquisitions failed (exit {rc}); scoring the others")
        suffix = "_desc-local_mask.nii.gz"
        for mask in sorted(settings.output_dir.glob(f"sub-*/anat/*{suffix}")):
            prefix = mask.name[: -len(suffix)]
            score = score_acquisition(
                ds, settings.output_dir, prefix, list(methods), method_params, seed=seed,
                background=settings.bg_method if background_oracle else None,
                background_params=(method_params or {}).get(settings.bg_method),
            )  # fmt: skip
            results.append(score)
            log(format_chain_table([score], header=not results[:-1]))
    return results


def format_chain_table(scores: list[ChainScore], header: bool = True) -> str:
    """Markdown: one row per acquisition and method (NRMSE %, HFEN %, XSIM); with the
    background oracle (any score has one), its kept % and local NRMSE / slope, and per method
    its NRMSE / HFEN / XSIM and background penalty."""
    bg = any(s.background for s in scores)
    lines = []
    if header:
        head = (
            "| dataset | acquisition | Dice | kept % | total NRMSE / slope (echo pair; fit"
            " penalty) | local NRMSE / slope"
            " (oracle) | method | covered % | end to end NRMSE / HFEN / XSIM | true local field"
            " | noise-matched oracle | chain penalty |"
        )
        if bg:
            head += (
                " background on the true total field: kept %, local NRMSE / slope | method on"
                " it | background penalty |"
            )
        lines += [head, "|---" * (15 if bg else 12) + "|"]
    for s in scores:
        head = (
            f"| {s.dataset} | {s.acquisition} | {s.dice:.3f} | {100 * s.kept:.1f} "
            f"| {s.total_nrmse:.1f} / {s.total_slope:.3f}{_pair_cell(s)} "
            f"| {s.local_nrmse:.1f} / {s.local_slope:.3f} ({s.oracle_field_nrmse:.1f}) "
        )
        for k, (method, row) in enumerate(s.methods.items()):
            cells = [method, f"{100 * row['covered']:.1f}", _triple(row["end_to_end"])]
            cells += [_triple(row[k2]) if k2 in row else "-" for k2 in ("oracle", "noise_oracle")]
            cells.append(f"{row['chain_penalty']:.2f}" if "chain_penalty" in row else "-")
            if bg:
                b = s.background
                cells.append(
                    f"{100 * b['kept']:.1f}, {b['local_nrmse']:.1f} / {b['local_slope']:.3f}"
                    f" ({b['method']})" if b and k == 0 else ""
                )  # fmt: skip
                cells.append(
                    _triple(row["background_oracle"]) if "background_oracle" in row else "-"
                )
                cells.append(
                    f"{row['background_penalty']:.2f}" if "background_penalty" in row else "-"
                )
            prefix = head if k == 0 else "| | | | | | "
            lines.append(prefix + "| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pair_cell(s: ChainScore) -> str:
    if s.echo_pair_nrmse is None:
        return ""
    penalty = f"; {s.fit_penalty:.2f}" if s.fit_penalty is not None else ""
    return f" ({s.echo_pair_nrmse:.1f} / {s.echo_pair_slope:.3f}{penalty})"


def _triple(m: dict) -> str:
    return f"{m['nrmse']:.1f} / {m['hfen']:.1f} / {m['xsim']:.3f}"
