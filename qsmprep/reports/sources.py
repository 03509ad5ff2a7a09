"""Files a subject report shows beside the derivatives: raw inputs and the reference map.

The derivatives name their raw inputs in their sidecars' ``Sources`` (BIDS URIs or paths
relative to a dataset): :func:`source_paths` finds them on disk (through the dataset links
of ``dataset_description.json``, the BIDS directory of the settings or the usual layout of a
derivative directory inside its dataset) and :func:`first_echo` picks the first-echo
magnitude and phase for the input figure and the mask background. :func:`reference_path`
finds the reference Chimap that the metrics were computed against.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from qsmprep.reports.collect import AcquisitionFiles, SubjectFiles, parse_name, read_sidecar

__all__ = ["first_echo", "reference_path", "source_paths"]


def source_paths(sources, output_dir: Path, settings: Mapping) -> list[Path]:
    """Existing files named by a sidecar's ``Sources`` (BIDS URIs or dataset-relative)."""
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list):
        return []
    roots: dict[str, Path] = {}
    desc = read_sidecar(output_dir / "dataset_description.json")
    for name, link in (desc.get("DatasetLinks") or {}).items():
        if isinstance(link, str) and not link.startswith(("http:", "https:", "doi:")):
            roots[name] = Path(link.removeprefix("file://"))
    base = []
    if settings.get("bids_dir"):
        base.append(Path(settings["bids_dir"]))
    base += [*roots.values(), output_dir.parent.parent, output_dir.parent]
    out = []
    for src in sources:
        if not isinstance(src, str):
            continue
        candidates = []
        match = re.match(r"^bids:([^:]*):(.*)$", src)
        if match:
            name, rel = match.groups()
            if name in roots:
                candidates.append(roots[name] / rel)
            candidates += [b / rel for b in base]
        elif os.path.isabs(src):
            candidates.append(Path(src))
        else:
            candidates += [b / src for b in base]
            if "/" not in src:  # a bare file name: its place in a BIDS dataset
                ents, _ = parse_name(src)
                if "sub" in ents:
                    ses = f"ses-{ents['ses']}/" if "ses" in ents else ""
                    rel = f"sub-{ents['sub']}/{ses}anat/{src}"
                    candidates += [b / rel for b in base]
        for cand in candidates:
            if cand.is_file():
                out.append(cand)
                break
    return out


def first_echo(paths: list[Path]) -> tuple[Path | None, Path | None]:
    """The first-echo magnitude and phase among raw input files."""
    best: dict[str, tuple[int, Path]] = {}
    for p in paths:
        if not p.name.endswith((".nii", ".nii.gz")):
            continue
        ents, suffix = parse_name(p.name)
        part = ents.get("part") or {"phase": "phase", "magnitude": "mag"}.get(suffix)
        if part not in ("mag", "phase"):
            continue
        try:
            echo = int(ents.get("echo", 1))
        except ValueError:
            echo = 1
        if part not in best or echo < best[part][0]:
            best[part] = (echo, p)
    return (best.get("mag", (0, None))[1], best.get("phase", (0, None))[1])


def reference_path(acq: AcquisitionFiles, files: SubjectFiles, output_dir, settings, metrics):
    """The reference Chimap of an acquisition: named in its metrics table, else the settings'
    reference, else the COSMOS map of its session (``None`` when the table says ``none``)."""
    names = {r.get("reference", "") for r in metrics[1]} if metrics else set()
    names = {n for n in names if n and n.lower() not in ("none", "n/a")}
    if metrics and not names and "reference" in metrics[0]:
        return None
    setting = settings.get("reference")
    for name in sorted(names):
        cand = [Path(name), Path(output_dir) / name]
        if setting and Path(setting).name == Path(name).name:
            cand.append(Path(setting))
        cos = files.cosmos.get(acq.session)
        if cos is not None and cos.name == Path(name).name:
            cand.append(cos)
        cand += sorted(files.root.rglob(Path(name).name))
        for c in cand:
            if c.is_file():
                return c
    if setting and Path(setting).is_file():
        return Path(setting)
    return files.cosmos.get(acq.session)
