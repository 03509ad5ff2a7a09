"""The BIDS App as a library: what ``qsmprep`` runs once its command line is parsed.

::

    from qsmprep.app import make_settings, run_group, run_participant

    settings = make_settings("data/bids", "data/derivatives/qsmprep", methods=["tkd", "tv"])
    code = run_participant(settings)  # 0 when every acquisition succeeded
    run_group(make_settings("data/bids", "data/derivatives/qsmprep", "group"))

- :func:`make_settings`: :class:`~qsmprep.config.Settings` from the options of ``qsmprep``,
  checked before any work, with the machine's defaults (:mod:`qsmprep.app.settings`);
  a :class:`~qsmprep.config.Settings` built directly serves as well.
- :func:`run_participant`, :func:`run_group`: the two analysis levels; :func:`run`: the level
  of a Settings as the command runs it, console display and error message included
  (:mod:`qsmprep.app.levels`).
- :func:`run_demo`: ``qsmprep demo`` (:mod:`qsmprep.app.demo`).
- :mod:`qsmprep.app.console`: the console display, the log file and the progress lines.

The command line (:mod:`qsmprep.cli`) only parses its arguments and calls these.
"""

from qsmprep.app.demo import run_demo
from qsmprep.app.levels import run, run_group, run_participant
from qsmprep.app.settings import (
    UsageError,
    default_nprocs,
    default_omp_nthreads,
    make_settings,
)

__all__ = [
    "UsageError",
    "default_nprocs",
    "default_omp_nthreads",
    "make_settings",
    "run",
    "run_demo",
    "run_group",
    "run_participant",
]
