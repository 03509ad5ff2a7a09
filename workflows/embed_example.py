#!/usr/bin/env python
"""Embed qsmprep's Nipype workflow in a pipeline of your own.

Runs on a small simulated dataset (nothing to download)::

    python workflows/embed_example.py /tmp/embed          # work dir and outputs under it

The pipeline (a ``nipype`` Workflow named ``my_pipeline``)::

    qsm_wf  (qsmprep.workflows.init_qsm_wf: mask, unwrap, field fit, background removal,
             one dipole inversion per method)
      outputnode.chimaps, outputnode.local_mask
        -> roi_stats  (your own node: mean susceptibility in each region of an atlas and the
                       error against a reference map, written as a TSV)

Here the atlas and the reference are the simulator's ground truth (labels and chi); with real
data they would be, for example, a registered atlas and a COSMOS map. ``output_dir=None`` leaves
out qsmprep's BIDS derivative sinks: the maps stay in the work directory and flow on through
``outputnode``. Give a folder instead to also get qsmprep's derivatives and sidecars.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from nipype.interfaces.utility import Function
from nipype.pipeline import engine as pe

from qsmprep.bids import collect_acquisitions
from qsmprep.sim.bids import simulate_bids_dataset
from qsmprep.workflows import init_qsm_wf

# A grid small enough to run in seconds: a 192 x 192 x 162 mm head at 3 mm.
SHAPE = (64, 64, 54)
VOXEL_SIZE = (3.0, 3.0, 3.0)
# Deep grey matter and white matter labels of the simulated head (qsmprep.sim.phantom)
ROIS = {
    1: "Caudate",
    2: "Globus pallidus",
    3: "Putamen",
    4: "Red nucleus",
    6: "Substantia nigra",
    7: "Thalamus",
    8: "White matter",
}


def roi_statistics(chimaps, methods, mask, labels, reference, rois, out_tsv):
    """Mean chi (ppm) per region and method, and each map's NRMSE (%) against a reference.

    qsmprep's maps are referenced to the mean of their mask (0 ppm), so the reference's region
    means are given on the same zero. A Nipype Function node runs this in its own process:
    imports live inside.
    """
    import csv

    import nibabel as nib
    import numpy as np

    from qsmprep.metrics import nrmse

    valid = nib.load(mask).get_fdata() > 0
    lab = np.asarray(nib.load(labels).dataobj).astype(int)
    ref = nib.load(reference).get_fdata()
    ref_zero = float(ref[valid].mean())
    rows = []
    for method, path in zip(methods, chimaps, strict=True):
        chi = nib.load(path).get_fdata()
        rows.append(
            {"method": method, "region": "brain", "voxels": int(valid.sum()),
             "mean_ppm": "", "reference_ppm": "",
             "nrmse_pct": round(float(nrmse(chi, ref, valid)), 2)}
        )  # fmt: skip
        for key, name in rois.items():
            roi = valid & (lab == int(key))
            if roi.sum() == 0:
                continue
            rows.append(
                {"method": method, "region": name, "voxels": int(roi.sum()),
                 "mean_ppm": round(float(chi[roi].mean()), 5),
                 "reference_ppm": round(float(ref[roi].mean()) - ref_zero, 5),
                 "nrmse_pct": ""}
            )  # fmt: skip
    with open(out_tsv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return out_tsv


def build_pipeline(acquisition, ground_truth: Path, out_tsv: Path, methods=("tkd", "tv")):
    """Your pipeline: qsmprep's QSM workflow of one acquisition feeding your own node."""
    methods = list(methods)
    pipeline = pe.Workflow(name="my_pipeline")
    qsm_wf = init_qsm_wf(acquisition=acquisition, output_dir=None, methods=methods, metrics=False)
    roi_stats = pe.Node(
        Function(
            input_names=["chimaps", "methods", "mask", "labels", "reference", "rois", "out_tsv"],
            output_names=["out_tsv"],
            function=roi_statistics,
        ),
        name="roi_stats",
    )
    sub = f"sub-{acquisition.subject}"
    roi_stats.inputs.methods = methods
    roi_stats.inputs.labels = str(ground_truth / sub / "anat" / f"{sub}_dseg.nii.gz")
    roi_stats.inputs.reference = str(ground_truth / sub / "anat" / f"{sub}_Chimap.nii.gz")
    roi_stats.inputs.rois = ROIS
    roi_stats.inputs.out_tsv = str(out_tsv)
    pipeline.connect([
        (qsm_wf, roi_stats, [("outputnode.chimaps", "chimaps"),
                             ("outputnode.local_mask", "mask")]),
    ])  # fmt: skip
    return pipeline


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="folder for the dataset, the work dir and results")
    p.add_argument("--methods", nargs="+", default=["tkd", "tv"])
    p.add_argument("--nprocs", type=int, default=2)
    a = p.parse_args(argv)
    out = a.out_dir.absolute()

    bids_dir = simulate_bids_dataset(out / "bids", shape=SHAPE, voxel_size=VOXEL_SIZE, seed=0)
    acquisition = collect_acquisitions(bids_dir, participant_label=["01"])[0]
    pipeline = build_pipeline(
        acquisition,
        bids_dir / "derivatives" / "groundtruth",
        out / "roi_stats.tsv",
        methods=a.methods,
    )
    pipeline.base_dir = str(out / "work")  # a rerun with the same folder reuses every node
    pipeline.config["execution"]["poll_sleep_duration"] = 0.2
    pipeline.run(plugin="MultiProc", plugin_args={"n_procs": a.nprocs})

    with open(out / "roi_stats.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    print(f"{'method':8s} {'region':18s} {'voxels':>7s} {'mean':>9s} {'truth':>9s} {'NRMSE':>7s}")
    for r in rows:
        print(
            f"{r['method']:8s} {r['region']:18s} {r['voxels']:>7s} {r['mean_ppm']:>9s} "
            f"{r['reference_ppm']:>9s} {r['nrmse_pct']:>7s}"
        )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
