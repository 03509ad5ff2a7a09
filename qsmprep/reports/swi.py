"""The susceptibility-weighted images of an acquisition's section: SWI, minIP and SMWI.

One mosaic per image found (``<prefix>_desc-{swi,minip,smwipara,smwidia}_T2starw``), centred
like the other maps of the acquisition, with the parameters recorded in its sidecar.
"""

from __future__ import annotations

from qsmprep.reports.collect import load_volume, read_sidecar, sidecar_key
from qsmprep.reports.markup import Report, esc, fmt

__all__ = ["swi_section"]

_SWI_TITLES = {
    "swi": ("SWI", "susceptibility-weighted image: combined magnitude times the phase mask"),
    "minip": ("minIP", "minimum intensity projection of the SWI over sliding slabs"),
    "smwipara": ("SMWI para", "magnitude weighted by the paramagnetic susceptibility mask"),
    "smwidia": ("SMWI dia", "magnitude weighted by the diamagnetic susceptibility mask"),
}


def swi_section(rep: Report, acq, brain, vs) -> str:
    """Mosaics of the SWI, its minIP and the SMWI, with their parameters."""
    from qsmprep.reports import figures as F

    if not acq.swi:
        return ""
    out = ["<h3>Susceptibility-weighted images</h3>"]
    center = F.View.from_mask(brain, vs).center if brain is not None and vs else None
    for desc, (title, text) in _SWI_TITLES.items():
        path = acq.swi.get(desc)
        if path is None:
            continue
        loaded = rep.attempt(f"{acq.prefix}: read {path.name}", load_volume, path)
        if loaded is None:
            continue
        vol, vs_i, _ = loaded
        # the minIP has fewer slices than the SWI: centre its planes by the fraction
        c = None
        if center is not None and brain is not None:
            c = tuple(
                min(int(round(ci * n / nb)), n - 1)
                for ci, n, nb in zip(center, vol.shape, brain.shape, strict=True)
            )
        view = F.View.full(vol.shape, vs_i, c)
        fig = rep.attempt(
            f"{acq.prefix}: {desc} mosaic",
            F.weighted_mosaic_figure,
            vol,
            view,
            rep.figdir / f"{acq.prefix}_desc-{desc}_mosaic.png",
            title=title,
        )
        side = read_sidecar(path)
        params = sidecar_key(side, "Parameters")
        shown = ", ".join(f"{k} {fmt(v)}" for k, v in params.items()) if params else ""
        extra = (
            f" from the {esc(side['SusceptibilityMethod'])} map"
            if side.get("SusceptibilityMethod")
            else ""
        )
        caption = f"<b>{esc(title)}</b> ({esc(path.name)}): {esc(text)}{extra}" + (
            f"; {shown}" if shown else ""
        )
        out.append(rep.figure(fig, caption, f"{title} mosaic"))
    return "\n".join(out)
