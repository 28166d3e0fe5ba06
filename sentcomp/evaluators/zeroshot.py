"""The zero-shot column and the zero-/few-shot variant cells: sentence completion with the label words
(:mod:`sentcomp.zeroshot`), no training at all, on the prompt row ``task*``. Every variant of the task's
:class:`~sentcomp.zeroshot.ZeroShotPlan` (``config.zeroshot``: templates × verbalizers × shots) is a cell holding
accuracy, ECE and Brier under every scoring rule; the table's ``zeroshot`` column is template 0, verbalizer 0,
k = 0 under ``config.zeroshot.rule``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from sentcomp import zeroshot
from sentcomp.data.tasks import Task, get_task
from sentcomp.data.text import encode_texts, word_set
from sentcomp.errors import SentcompError
from sentcomp.evaluators.base import Evaluator, ModelLoader
from sentcomp.evaluators.cells import CellLog, cell_key
from sentcomp.evaluators.columns import extraction_options
from sentcomp.evaluators.task_data import TaskData
from sentcomp.features import RowRequest, extract_features
from sentcomp.results import timings
from sentcomp.zeroshot import ZeroShotPlan, ZeroShotVariant

ZEROSHOT = "zeroshot"


def zeroshot_plan(task: Task, zs) -> ZeroShotPlan:
    """The task's plan from ``config.zeroshot`` (``templates``/``verbalizers`` ``()``: the task's own)."""
    return ZeroShotPlan.for_task(task, zs.templates, zs.verbalizers, shots=zs.shots,
                                 sensitivity_shots=zs.sensitivity_shots, balanced=zs.balanced,
                                 separator=zs.separator, seed=zs.seed)


def variant_key(plan: ZeroShotPlan, variant: ZeroShotVariant, task: str, repeat: int) -> str:
    """A variant cell's key: the variant's content (and the k-shot sampling settings) hashed
    (:meth:`ZeroShotPlan.digest`), so changing the templates, verbalizers or shots never reuses another variant's
    cell (nor invalidates the others)."""
    return cell_key(task, True, f"{ZEROSHOT}:{variant.k}-shot:{plan.digest(variant)}", repeat)


def check_zeroshot_config(config) -> None:
    """``config.zeroshot`` and ``config.prompt_probes`` are usable: a known headline ``rule``, shots ≥ 0 (k > 0
    needs ``truncation="start"``,
    which drops the demonstrations before the test text), non-blank templates, verbalizers that fit every task
    of ``config.tasks``, ``ece_bins`` ≥ 1. Raises one :class:`SentcompError` naming the key and the fix."""
    zs = config.zeroshot
    zeroshot.check_rule(zs.rule)
    for key in ("shots", "sensitivity_shots"):
        values = zs[key]
        if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in values):
            raise SentcompError(f"config.zeroshot.{key} must be a tuple of numbers of demonstrations k ≥ 0, got "
                                f"{values!r}; e.g. --config.zeroshot.{key}='(0, 4)'.")
    shots = config.prompt_probes.shots
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise SentcompError(f"config.prompt_probes.shots must be a number of demonstrations k ≥ 0 (0: none), got "
                            f"{shots!r}.")
    if config.truncation != "start" and any(k > 0 for k in (*zs.shots, *zs.sensitivity_shots, shots)):
        raise SentcompError("k-shot contexts (config.zeroshot.shots / sensitivity_shots, prompt_probes.shots > 0) need "
                            f"config.truncation='start' (got {config.truncation!r}): with 'end' a long context "
                            "would lose the test text and the prompt instead of the demonstrations.")
    if not all(isinstance(t, str) and t.strip() for t in zs.templates):
        raise SentcompError(f"config.zeroshot.templates must be non-blank prompts such as ' This movie is ', got "
                            f"{tuple(zs.templates)!r} (empty tuple: each task's own templates).")
    if not isinstance(zs.separator, str):
        raise SentcompError(f"config.zeroshot.separator must be a string such as '\\n\\n', got {zs.separator!r}.")
    if not isinstance(zs.ece_bins, int) or zs.ece_bins < 1:
        raise SentcompError(f"config.zeroshot.ece_bins must be a positive number of bins, got {zs.ece_bins!r}.")
    for name in config.tasks:
        for template in zeroshot_plan(get_task(name), zs).templates:
            zeroshot.check_template(template)


def score_options(config) -> dict:
    """:func:`sentcomp.zeroshot.score_words`'s options from the run's config."""
    return dict(batch_size=config.batch_size, max_length=config.max_length, compute_dtype=config.compute_dtype,
                truncation=config.truncation)


def prompt_zeroshot_words(task: Task, config) -> tuple[str, ...]:
    """The zero-shot words scored at k = 0 right after the task's prompt (the variants of the plan with k = 0
    whose template is ``task.prompt``): the prompt row's feature pass extracts their log-probabilities too, so
    those variants need no pass of their own (:func:`scores_from_extraction`)."""
    if not config.zeroshot.enabled:
        return ()
    return tuple(dict.fromkeys(word for variant in zeroshot_plan(task, config.zeroshot).variants()
                               if not variant.k and variant.template == task.prompt
                               for word in zeroshot.verbalizer_words(task.label_names, variant.verbalizer)[0]))


def test_texts(data: TaskData) -> tuple[str, ...]:
    """The unique test texts of every split of ``data``: the texts zero-shot scores."""
    return tuple(dict.fromkeys(text for _, test in data.pairs for text in test.texts))


def template_request(lm, template: str, words: Sequence[str], texts: Sequence[str]) -> RowRequest | None:
    """The extraction a template's k = 0 scores can be read off (``word_log_probs`` of ``words`` after every
    ``text + template``, :func:`scores_from_extraction`), declared to the program's one pass over the texts: for a
    model with a key/value cache (the template's row then continues each text's cached states) and words that are
    single tokens after a space. None otherwise: the template gets a scoring pass of its own."""
    if lm.prefill_fn is None or not all(" " + word in word_set(lm.tokenizer, [word]).forms for word in words):
        return None
    return RowRequest(("word_log_probs",), template, tuple(sorted(words)), tuple(texts))


def scores_from_extraction(lm, extraction: dict, extraction_texts: Sequence[str], texts: Sequence[str],
                           template: str, words: Sequence[str], config) -> zeroshot.WordScores | None:
    """:func:`sentcomp.zeroshot.score_words` of ``texts`` at k = 0 read off an extraction of ``word_log_probs`` at
    f(s) of ``text + template`` over ``extraction_texts`` (the prompt row's, or a template's
    :func:`template_request`), when that is the same computation: every word's continuation is one token among the
    extraction's words and every context is the extraction's token sequence (so ``log p(w | context)`` is the
    extracted value). The content-free texts are scored by the model (one small batch). None when any of this does
    not hold (the caller runs its own pass)."""
    max_length = min(config.max_length, lm.max_length)
    rows = zeroshot.build_rows(lm.tokenizer, texts, template, words, max_length, config.truncation)
    contexts = encode_texts(lm.tokenizer, texts, max_length, template, truncation=config.truncation).token_ids
    columns = {token: column for column, token in enumerate(extraction["metadata"]["words"]["token_ids"])}
    if not all(row.start == len(row.input_ids) - 1 and tuple(int(t) for t in contexts[row.document]) == row.input_ids
               and all(len(target) == 1 and target[0] in columns for target in row.targets) for row in rows):
        return None
    pool = {text: index for index, text in enumerate(extraction_texts)}
    log_probs = extraction["word_log_probs"]
    scores = np.full((len(texts), len(words)), np.nan)
    for row in rows:
        scores[row.document, list(row.words)] = log_probs[pool[texts[row.document]],
                                                          [columns[target[0]] for target in row.targets]]
    content_free = zeroshot.word_scores(lm, zeroshot.CONTENT_FREE_TEXTS, template, words, progress=False,
                                        **score_options(config))
    return zeroshot.WordScores(tuple(words), scores, content_free)


class ZeroShotColumn(Evaluator):
    """Every variant cell of the plan not yet in the log, then the table's ``zeroshot`` column. At k = 0 each
    template's scores are read off an extraction when that is exact (:func:`scores_from_extraction`): the prompt
    row's for the task's prompt, and for the other templates their own (:func:`template_request`), which the
    program computes in its one pass over the texts; otherwise a model pass per template
    (:meth:`ZeroShotPlan.passes`). One pass per variant and split at k > 0."""

    @staticmethod
    def enabled(config) -> bool:
        return config.zeroshot.enabled

    def columns(self) -> list[str]:
        return [ZEROSHOT]

    def check(self, datas: Sequence[TaskData]) -> None:
        """Every k-shot context of the plan can be drawn from each split's train set: checked once the data is
        read, before the model loads, instead of failing after every probe ran."""
        for data in datas:
            zeroshot_plan(data.task, self.config.zeroshot).check_demonstrations(data.pairs)

    def todo(self, data: TaskData, log: CellLog) -> list[tuple[ZeroShotVariant, int]]:
        """The plan's ``(variant, split)`` cells not yet in ``log``."""
        plan = zeroshot_plan(data.task, self.config.zeroshot)
        return [(variant, r) for variant in plan.variants() for r in range(len(data.pairs))
                if variant_key(plan, variant, data.task.name, r) not in log]

    def k0_template_words(self, data: TaskData, log: CellLog) -> dict[str, tuple[str, ...]]:
        """Each template but the task's prompt with a missing k = 0 cell, and the words of its missing k = 0
        variants (what its scoring pass scores, :meth:`sentcomp.zeroshot.ZeroShotPlan.passes`)."""
        words: dict[str, dict[str, None]] = {}
        for variant, _ in self.todo(data, log):
            if not variant.k and variant.template != data.task.prompt:
                words.setdefault(variant.template, {}).update(dict.fromkeys(
                    zeroshot.verbalizer_words(data.task.label_names, variant.verbalizer)[0]))
        return {template: tuple(chosen) for template, chosen in words.items()}

    def extractions(self, data: TaskData, log: CellLog, load_model: ModelLoader) -> list[RowRequest]:
        """Each k = 0 template's extraction (:func:`template_request`), read in the program's one pass over the
        texts (the task's prompt is the prompt row's, which the probe columns declare)."""
        templates = self.k0_template_words(data, log)
        if not templates:
            return []
        lm, texts = load_model(), test_texts(data)
        return [request for template, words in templates.items()
                if (request := template_request(lm, template, words, texts)) is not None]

    def cells(self, data: TaskData, log: CellLog, load_model: ModelLoader) -> Iterator[dict]:
        config, task, name = self.config, data.task, data.task.name
        plan = zeroshot_plan(task, config.zeroshot)
        todo = self.todo(data, log)
        template_words = self.k0_template_words(data, log)

        def read_off_extraction(lm, texts, template, words) -> zeroshot.WordScores | None:
            if template == task.prompt:
                extraction = data.prompt_extraction
                return (scores_from_extraction(lm, extraction, data.texts, texts, template, words, config)
                        if extraction is not None else None)
            pool = test_texts(data)
            request = template_request(lm, template, template_words[template], pool)
            if request is None:
                return None
            extraction = extract_features(lm, pool, request.kinds, words=request.words, prompt=template,
                                          options=extraction_options(config, self.workdir))
            return scores_from_extraction(lm, extraction, pool, texts, template, words, config)

        def scorer(texts, variant, words, prefix):
            lm, template = load_model(), variant.template
            with timings.part(f"zero-shot {name}* {template.strip()!r} k={variant.k}"):
                scores = read_off_extraction(lm, texts, template, words) if not prefix else None
                if scores is None:
                    scores = zeroshot.score_words(lm, texts, template, words, prefix, **score_options(config))
            return scores

        for variant, r, record in plan.score(task, data.pairs, todo, scorer, config.zeroshot.ece_bins):
            yield {"key": variant_key(plan, variant, name, r), "kind": "zeroshot_variant", "row": name + "*",
                   "repeat": r, **record}
        headline, rule = plan.headline(), config.zeroshot.rule
        for r in range(len(data.pairs)):
            key = cell_key(name, True, ZEROSHOT, r)
            if key not in log or log.cells[key].get("rule") != rule:
                variant_cell = log.cells[variant_key(plan, headline, name, r)]
                yield {"key": key, "row": name + "*", "column": ZEROSHOT, "repeat": r,
                       "test_accuracy": variant_cell["rules"][rule]["accuracy"], "rule": rule,
                       "words": list(zeroshot.verbalizer_words(task.label_names, headline.verbalizer)[0])}

    def describe(self, data: TaskData) -> dict:
        plan = zeroshot_plan(data.task, self.config.zeroshot)
        return {"templates": list(plan.templates), "verbalizers": [
            {label: list(words) for label, words in verbalizer.items()} for verbalizer in plan.verbalizers]}

    def results(self, datas: Sequence[TaskData], log: CellLog, table: dict[str, dict[str, dict]]) -> dict:
        """``zeroshot``: :func:`sentcomp.zeroshot.summarise_variants` of the current plan's variant cells (cells of
        other templates or shots in the log are left out)."""
        cells = []
        for data in datas:
            plan = zeroshot_plan(data.task, self.config.zeroshot)
            cells += [log.cells[variant_key(plan, v, data.task.name, r)] for v in plan.variants()
                      for r in range(len(data.pairs))]
        return {"zeroshot": zeroshot.summarise_variants(cells, self.config.zeroshot.sensitivity_shots)}
