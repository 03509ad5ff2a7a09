"""Benchmarks behind ``qsmprep-bench``: simulated data in, measured tables out."""
