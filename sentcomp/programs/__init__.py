"""Experiment programs: one module per program, each with ``run(config, workdir)``.

``config.program`` names one of them (e.g. ``"sentcomp.programs.table1"``). Programs compose the library
(:mod:`sentcomp.features`, :mod:`sentcomp.probe`, :mod:`sentcomp.training`, ...); they never import each other
or the launcher.
"""
