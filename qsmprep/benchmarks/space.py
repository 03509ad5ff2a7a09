"""``qsmprep-bench space``: atlas ROI means against ground-truth labels, registration quality,
and the wall time template space adds to a participant.

On a BIDS dataset with a ground-truth derivative (``derivatives/groundtruth``: ``*_Chimap``,
``*_dseg`` numbered as :data:`qsmprep.space.atlas.ROIS`, like the development data and
:mod:`qsmprep.sim.bids`), the benchmark runs the App's participant level with output spaces
(:mod:`qsmprep.app`; ``qsmprep ... participant --output-spaces ...``) one subject at a time
(and, with ``timing``, the same without template space) and reports per subject and nucleus:

- ``true/true``: the true chi averaged over the true labels (the target);
- ``true/atlas``: the true chi over the atlas labels warped to the subject (labelling error:
  registration plus the atlas's own delineation);
- ``pipe/atlas``: the pipeline's chi over the atlas labels (the ``_roistats.tsv`` value);
- ``pipe/true``: the pipeline's chi over the true labels (inversion error alone);
- Dice of the warped atlas region and the true region.

All means are over the region intersected with the pipeline's local-field mask; the true chi
is referenced like the pipeline's (mean over the local mask, or the ventricles with
``--reference-region csf``).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from qsmprep.nifti import load_data

__all__ = ["run_space_benchmark"]


def _timed_run(**options) -> float:
    """Wall time (s) of one participant-level run of the App (options of
    :func:`qsmprep.app.make_settings`), its own printing silenced."""
    from qsmprep.app import make_settings, run

    t0 = time.perf_counter()
    settings = make_settings(**options)
    with contextlib.redirect_stdout(io.StringIO()):
        code = run(settings)
    if code != 0:
        raise RuntimeError(
            f"qsmprep {settings.bids_dir} {settings.output_dir} participant failed (exit {code})"
        )
    return time.perf_counter() - t0


def _subjects(bids: Path) -> list[str]:
    return sorted(p.name[4:] for p in bids.glob("sub-*") if p.is_dir())


def evaluate_subject(bids: Path, out: Path, sub: str, method: str, reference: str) -> dict:
    """ROI means of one subject (see the module doc) from the files on disk."""
    from qsmprep.space.atlas import CSF_LABEL, ROIS
    from qsmprep.space.registration import dice

    anat = out / f"sub-{sub}" / "anat"
    gt = bids / "derivatives" / "groundtruth" / f"sub-{sub}" / "anat"
    local = load_data(anat / f"sub-{sub}_desc-local_mask.nii.gz", np.float64) > 0
    atlas = load_data(anat / f"sub-{sub}_desc-atlas_dseg.nii.gz", np.int16)
    pipe = load_data(anat / f"sub-{sub}_desc-{method}_Chimap.nii.gz", np.float64)
    true = load_data(gt / f"sub-{sub}_Chimap.nii.gz", np.float64)
    dseg = load_data(gt / f"sub-{sub}_dseg.nii.gz", np.int16)
    if reference == "csf":
        true = true - true[(atlas == CSF_LABEL) & local].mean()
    else:
        true = true - true[local].mean()
    xfm = sorted(anat.glob(f"sub-{sub}_from-*_to-*_mode-image_xfm.json"))
    brain_dice = json.loads(xfm[0].read_text()).get("Dice") if xfm else None
    rows = []
    for lab, name in ROIS.items():
        t_reg, a_reg = (dseg == lab) & local, (atlas == lab) & local
        if not a_reg.any():
            continue
        rows.append(
            {
                "roi": name,
                "true/true": float(true[t_reg].mean()) if t_reg.any() else float("nan"),
                "true/atlas": float(true[a_reg].mean()),
                "pipe/atlas": float(pipe[a_reg].mean()),
                "pipe/true": float(pipe[t_reg].mean()) if t_reg.any() else float("nan"),
                "dice": dice(a_reg, t_reg),
                "voxels_true": int(t_reg.sum()),
                "voxels_atlas": int(a_reg.sum()),
            }
        )
    return {"subject": sub, "brain_dice": brain_dice, "rows": rows}


def _markdown(results: list[dict], timing: dict, method: str) -> str:
    lines = [
        f"| subject | ROI | true/true | true/atlas | pipe ({method})/atlas | "
        f"pipe ({method})/true | Dice | voxels true/atlas |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["rows"]:
            lines.append(
                f"| {res['subject']} | {r['roi']} | {r['true/true']:.4f} | {r['true/atlas']:.4f}"
                f" | {r['pipe/atlas']:.4f} | {r['pipe/true']:.4f} | {r['dice']:.2f} | "
                f"{r['voxels_true']}/{r['voxels_atlas']} |"
            )
    lines.append("")
    for res in results:
        lines.append(f"sub-{res['subject']}: Dice of the warped brain mask {res['brain_dice']}")
    for sub, t in timing.items():
        extra = t.get("with", float("nan")) - t.get("without", float("nan"))
        lines.append(
            f"sub-{sub}: wall time {t.get('without', float('nan')):.1f} s native only, "
            f"{t.get('with', float('nan')):.1f} s with template space (+{extra:.1f} s)"
        )
    return "\n".join(lines)


def run_space_benchmark(
    bids_dir,
    out_dir,
    *,
    methods=("tv",),
    output_spaces=("MNI152NLin2009cAsym:res-1",),
    reference_region: str = "mask",
    nprocs: int = 2,
    timing: bool = True,
    **options,
) -> dict:
    """Run the pipeline on every subject and score the atlas path (see the module doc).

    ``options`` are further options of the runs (keywords of :func:`qsmprep.app.make_settings`).

    Returns ``{"results": [...], "timing": {sub: {"with": s, "without": s}}, "markdown": str}``.
    """
    bids, out = Path(bids_dir).absolute(), Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    methods = list(methods)
    common = {"methods": methods, "nprocs": nprocs, "device": "cpu", **options}
    timing_out: dict = {}
    results = []
    for sub in _subjects(bids):
        timing_out.setdefault(sub, {})["with"] = _timed_run(
            bids_dir=bids, output_dir=out / "with", participant_label=[sub],
            work_dir=out / "work_with", output_spaces=list(output_spaces),
            reference_region=reference_region, **common,
        )  # fmt: skip
        if timing:
            timing_out[sub]["without"] = _timed_run(
                bids_dir=bids, output_dir=out / "without", participant_label=[sub],
                work_dir=out / "work_without", **common,
            )  # fmt: skip
        results.append(evaluate_subject(bids, out / "with", sub, methods[0], reference_region))
        print(f"sub-{sub}: {timing_out[sub]}", flush=True)
    md = _markdown(results, timing_out, methods[0])
    return {"results": results, "timing": timing_out, "markdown": md}
