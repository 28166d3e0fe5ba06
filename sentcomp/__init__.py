"""sentcomp: sentence-completion analysis of why language models help downstream tasks (arXiv 2010.03648)."""

import os

# On CPU, idle OpenBLAS worker threads (numpy's, and scipy's, which runs JAX's CPU ``eigh``) spin for ~0.1 s
# after every call, taking the cores from the XLA threads that run next: the ridge probe grid lost 30–60 ms
# per call to them (docs/probes.md). The minimum timeout, 2⁴ cycles, puts them to sleep at once. It reaches
# only the BLAS libraries loaded after this import; export the variable yourself to choose another value.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
