"""What every program shares about its results, one module per role (none imports JAX at module level except
:mod:`~sentcomp.results.timings`, which reads JAX's compilation events):

* :mod:`~sentcomp.results.storage`: the files a run writes (atomically and durably) and the content hashes that key
  its caches.
* :mod:`~sentcomp.results.statistics`: the statistics the tables report (Wilson intervals, macro-F1, calibration:
  ECE and Brier score).
* :mod:`~sentcomp.results.tables`: Markdown tables.
* :mod:`~sentcomp.results.plots`: the figures (matplotlib, PNG files).
* :mod:`~sentcomp.results.timings`: where a run's time goes, and JAX's persistent compilation cache.
"""
