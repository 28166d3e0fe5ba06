"""The command line's machinery: config files, running a program in its workdir, sweeps, cloud and local
clusters.

Nothing here is imported on ``import sentcomp.launcher``: :mod:`sentcomp.launcher.sweep` (the point algebra
config files use) and :mod:`sentcomp.launcher.config_files` do not import JAX, and
:mod:`sentcomp.launcher.launch` needs only the standard library (it runs on a workstation with ``python3``).
"""
