"""Devices: one resolver for the numerics in :mod:`qsmprep.recon` and the networks in
:mod:`qsmprep.dl`.

Device strings (``--device``, the ``device=`` arguments):

``"auto"``
    a CUDA GPU when torch sees one, else the CPU;
``"cpu"``
    the CPU. What runs there depends on the code: the array numerics of :mod:`qsmprep.recon`
    use NumPy and SciPy (``cpu="numpy"`` below), the networks of :mod:`qsmprep.dl` use torch
    (``cpu="torch"``);
``"torch"``
    torch on the CPU (the GPU code path of :mod:`qsmprep.recon`, run anywhere);
``"cuda"``, ``"cuda:N"``, ``"mps"``
    torch on that device.

Importing this module does not import torch.
"""

from __future__ import annotations

__all__ = ["DEVICES", "cuda_available", "gpu_work", "resolve_device"]

DEVICES = ("cpu", "auto", "cuda", "torch")
"""The device names a step accepts (``--device``; see :func:`resolve_device`)."""

_CPU = ("numpy", "torch")


def cuda_available() -> bool:
    """Whether torch sees a CUDA device now (False when torch cannot be imported)."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - no (working) torch, no GPU
        return False
    return bool(torch.cuda.is_available())


def resolve_device(device="auto", *, cpu: str = "torch"):
    """The device that ``device`` names, for code whose CPU path is ``cpu``.

    Parameters
    ----------
    device : str, torch.device or None
        See the module docstring. ``None``: the CPU path with ``cpu="numpy"``, ``"auto"`` with
        ``cpu="torch"``.
    cpu : {"torch", "numpy"}
        What the CPU means to the caller: ``"numpy"`` for the array numerics of
        :mod:`qsmprep.recon` (the CPU gives ``None``, the NumPy backend), ``"torch"`` for the
        networks (the CPU gives ``torch.device("cpu")``).

    Returns
    -------
    torch.device, or None for the NumPy backend (only with ``cpu="numpy"``).

    Raises
    ------
    ValueError
        For an unknown device, or CUDA asked for where it is not available (use ``"cpu"`` or
        ``"auto"``).
    """
    if cpu not in _CPU:
        raise ValueError(f"cpu must be one of {_CPU}, got {cpu!r}")
    numpy_cpu = cpu == "numpy"
    if numpy_cpu and device in (None, "cpu", "numpy"):
        return None
    if device in (None, "auto"):
        if cuda_available():
            import torch

            return torch.device("cuda")
        if numpy_cpu:
            return None
        device = "cpu"
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif device in ("cpu", "torch"):
        return torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda' (or 'cuda:N')"
            ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} requested but CUDA is not available here; use device='cpu' "
            "or device='auto'"
        )
    return dev


def gpu_work(device) -> bool:
    """Whether work on ``device`` runs on a GPU: for Nipype's MultiProc scheduler.

    ``"cuda"`` (and ``"cuda:N"``) always; ``"auto"`` when torch sees a CUDA device now (the
    same test the numerics make at run time). MultiProc refuses to start a graph with GPU
    nodes when it counts no GPU slot (``n_gpu_procs``, by default the GPUs that
    ``nvidia-smi`` lists).
    """
    if str(device).startswith("cuda"):
        return True
    if device == "auto":
        return cuda_available()
    return False
