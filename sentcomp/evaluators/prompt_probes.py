"""The prompt row's probes again under each other zero-shot template (rows ``task*t1``, ``task*t2``, ...) and
after a k-shot prefix of the task's prompt and label words (row ``task*k<shots>``): ``config.prompt_probes``,
off by default (one feature extraction per variant and split). With a k-shot prefix, the demonstrations come from
the split's train set (never a test text), precede every train and test text alike, and are left out of the
probe's training set."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from sentcomp.data import Split
from sentcomp.data.tasks import Task
from sentcomp.evaluators.base import Evaluator, ModelLoader
from sentcomp.evaluators.cells import CellLog, summarise
from sentcomp.evaluators.columns import columns_for, row_features
from sentcomp.evaluators.probes import cell_multi_class, probe_cell
from sentcomp.evaluators.task_data import TaskData, rows_of
from sentcomp.evaluators.zeroshot import zeroshot_plan
from sentcomp.results import storage, timings
from sentcomp.zeroshot import ZeroShotPlan, ZeroShotVariant


def probe_variants(task: Task, config) -> list[tuple[str, str, int]]:
    """``(row, template, k)`` of the extra prompt rows ``config.prompt_probes`` asks for: the prompt row under
    each other template (``templates``; rows ``task*t1``, ``task*t2``, ...), and after a k-shot prefix of the
    task's prompt and label words (``shots`` > 0; row ``task*k<shots>``)."""
    variants = []
    if config.prompt_probes.templates:
        templates = zeroshot_plan(task, config.zeroshot).templates
        variants += [(f"{task.name}*t{t}", template, 0) for t, template in enumerate(templates) if t]
    if config.prompt_probes.shots:
        variants.append((f"{task.name}*k{config.prompt_probes.shots}", task.prompt, config.prompt_probes.shots))
    return variants


def probe_variant_key(row: str, template: str, k: int, column: str, repeat: int, plan: ZeroShotPlan) -> str:
    """A probe-variant cell's key: the template and k-shot sampling settings hashed in (they are not determinants)."""
    return f"{row}@{storage.content_hash(template, k, plan.sampling(k))}/{column}/{repeat}"


def probe_sensitivity(table: dict[str, dict[str, dict]], variant_cells: Sequence[dict],
                      tasks: Sequence[str]) -> list[dict]:
    """Per task and probe column: the accuracy of the prompt row (``task*``) and of each probe variant row
    (mean over splits), and their mean, min and max over the templates (the ``t`` rows with ``task*``)."""
    by_row = summarise({**cell, "column": cell["variant_column"]} for cell in variant_cells)
    varied = {cell["variant_column"] for cell in variant_cells}  # the config's columns, not every one logged
    entries = []
    for name in tasks:
        for column, entry in table.get(name + "*", {}).items():
            if column not in varied:
                continue
            rows = {name + "*": entry["mean"], **{row: cells[column]["mean"] for row, cells in by_row.items()
                                                  if row.startswith(name + "*") and column in cells}}
            templates = [value for row, value in rows.items() if row == name + "*" or row[len(name) + 1] == "t"]
            entries.append({"task": name, "column": column, "accuracies": rows, "mean": float(np.mean(templates)),
                            "min": min(templates), "max": max(templates), "n_templates": len(templates)})
    return entries


class PromptProbes(Evaluator):
    @staticmethod
    def enabled(config) -> bool:
        return bool(config.prompt_probes.templates or config.prompt_probes.shots)

    def cells(self, data: TaskData, log: CellLog, load_model: ModelLoader) -> Iterator[dict]:
        config, task = self.config, data.task
        plan, columns = zeroshot_plan(task, config.zeroshot), columns_for(task, config.columns)
        for row, template, k in probe_variants(task, config):
            for r, (train, test) in enumerate(data.pairs):
                todo = [c for c in columns if probe_variant_key(row, template, k, c, r, plan) not in log]
                if not todo:
                    continue
                prefix, chosen = plan.demonstrations(ZeroShotVariant(k, 0, 0, template, dict(task.label_words)),
                                                     task.label_names, train, test)
                keep = np.setdiff1d(np.arange(len(train)), chosen)
                kept_train = Split([train.texts[i] for i in keep], train.labels[keep])
                texts = list(dict.fromkeys([*kept_train.texts, *test.texts]))
                lm = load_model()
                with timings.part(f"features {row}"):
                    features, _, _ = row_features(lm, task, [prefix + text for text in texts], todo, template,
                                                  config, self.workdir)
                pool = {text: i for i, text in enumerate(texts)}
                pair_rows = (rows_of(kept_train.texts, pool), rows_of(test.texts, pool))
                for column in todo:
                    cell = probe_cell(features[column], pair_rows, (kept_train, test), config.probe,
                                      cell_multi_class(config.probe, task.name, column))
                    yield {"key": probe_variant_key(row, template, k, column, r, plan), "kind": "probe_variant",
                           "row": row, "variant_column": column, "repeat": r, "template": template, "k": k,
                           "demonstrations": chosen, "n_train": len(kept_train), **cell}

    def results(self, datas: Sequence[TaskData], log: CellLog, table: dict[str, dict[str, dict]]) -> dict:
        """``probe_variants``: :func:`probe_sensitivity` of the current config's probe-variant cells."""
        cells = []
        for data in datas:
            plan, columns = zeroshot_plan(data.task, self.config.zeroshot), columns_for(data.task, self.config.columns)
            cells += [log.cells[probe_variant_key(row, template, k, c, r, plan)]
                      for row, template, k in probe_variants(data.task, self.config) for c in columns
                      for r in range(len(data.pairs))]
        return {"probe_variants": probe_sensitivity(table, cells, [data.task.name for data in datas])} if cells else {}
