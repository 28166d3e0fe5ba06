"""Table 1's column families, each an :class:`~sentcomp.evaluators.base.Evaluator` that yields its cells
(:mod:`sentcomp.programs.table1` runs the enabled ones over every task):

- :mod:`~sentcomp.evaluators.probes`: linear probes on the LM's feature columns (:mod:`~.columns`), rows ``task``
  and ``task*`` (with the prompt);
- :mod:`~sentcomp.evaluators.bert`: the BERT baseline's ``[CLS]`` features, probed alike;
- :mod:`~sentcomp.evaluators.finetune`: the LM fine-tuned end to end with a linear head;
- :mod:`~sentcomp.evaluators.prompt_probes`: the prompt row's probes under other templates and a k-shot prefix;
- :mod:`~sentcomp.evaluators.zeroshot`: zero-/few-shot sentence completion (the plan:
  :class:`sentcomp.zeroshot.ZeroShotPlan`).

Shared: :mod:`~.task_data` (a task's splits and unique texts) and :mod:`~.cells` (the resumable cell log and the
fingerprint of what determines a cell's value).
"""
