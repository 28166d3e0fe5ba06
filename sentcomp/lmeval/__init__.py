"""lm-evaluation-harness and sentcomp, both directions (needs the ``lmeval`` extra: ``pip install -e '.[lmeval]'``).

- :mod:`sentcomp.lmeval.model`: sentcomp's models as the lm-eval backend ``sentcomp`` (importing this package
  registers it): ``lm_eval.simple_evaluate(model="sentcomp", model_args="pretrained=smollm2-135m", ...)``, or
  ``python -m sentcomp.lmeval --model sentcomp ...`` (lm-eval's command line).
- :mod:`sentcomp.lmeval.tasks`: lm-eval multiple-choice tasks as sentcomp tasks (``task="lmeval:<name or
  YAML>"`` in experiments/table1.py).

The only part of sentcomp that imports ``lm_eval``. docs/lmeval.md.
"""

from sentcomp.lmeval.model import SentcompLM

__all__ = ["SentcompLM"]
