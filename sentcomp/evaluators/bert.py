"""The BERT column (``config.bert``, off by default): the paper's BERT-base-cased baseline, ``[CLS]`` after the MLM
head's transform with the prompt before ``[SEP]`` (:func:`sentcomp.baselines.bert_features`;
``config.bert.pooling``), probed on both rows exactly like the LM's features."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from sentcomp import models
from sentcomp.evaluators.base import Evaluator, ModelLoader
from sentcomp.evaluators.cells import CellLog
from sentcomp.evaluators.probes import missing, probe_cells, row_name
from sentcomp.evaluators.task_data import TaskData
from sentcomp.results import timings

BERT = "bert"


@functools.lru_cache(maxsize=1)
def bert_encoder(source: str):
    return models.load(source)


def bert_column_features(config, texts: Sequence[str], prompt: str | None, cache_dir: Path | None = None
                         ) -> np.ndarray:
    """The BERT column's ``[N, features]`` matrix of ``texts`` (+ ``prompt``), cached under ``cache_dir``."""
    from sentcomp.baselines import bert_features

    return bert_features(bert_encoder(config.bert.model), texts, prompt, pooling=config.bert.pooling,
                         max_length=config.max_length, batch_size=config.batch_size, truncation=config.truncation,
                         cache_dir=cache_dir)


class BertColumn(Evaluator):
    @staticmethod
    def enabled(config) -> bool:
        return config.bert.enabled

    def columns(self) -> list[str]:
        return [BERT]

    def cells(self, data: TaskData, log: CellLog, load_model: ModelLoader) -> Iterator[dict]:
        for with_prompt in (False, True):
            todo = missing(data, with_prompt, [BERT], log)
            if not todo:
                continue
            with timings.part(f"features {row_name(data, with_prompt)}"):
                features = bert_column_features(self.config, data.texts, data.task.prompt if with_prompt else None,
                                                self.workdir / "features")
            yield from probe_cells({BERT: features}, todo, data, with_prompt, {}, self.config.probe)
