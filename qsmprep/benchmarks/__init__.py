"""Benchmarks behind ``qsmprep-bench`` and ``qsmprep-train bench``: simulated data in,
measured tables out.

``field`` and ``inversion`` time the numerics in units of their FFTs (:mod:`.timing`);
``accuracy``, ``chain``, ``participant`` and ``space`` run the App (:mod:`qsmprep.app`) and
score what it wrote; ``training`` measures the networks' training throughput.
"""
