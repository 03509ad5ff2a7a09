"""Command-line entry points: ``qsmprep`` (BIDS App and demo) and ``qsmprep-bench``."""
