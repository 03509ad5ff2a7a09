"""Command-line entry points: ``qsmprep`` (BIDS App and demo), ``qsmprep-bench``,
``qsmprep-train`` and ``qsmprep-templates``.

They parse their arguments and call the library: :mod:`qsmprep.app` (the App),
:mod:`qsmprep.benchmarks`, :mod:`qsmprep.dl` and :mod:`qsmprep.space`. Nothing else in the
package imports this one.
"""
