"""The one interface of Table 1's column families (:class:`Evaluator`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sentcomp.evaluators.cells import CellLog
from sentcomp.evaluators.task_data import TaskData
from sentcomp.features import RowRequest
from sentcomp.models.base import LanguageModel

ModelLoader = Callable[[], LanguageModel]  # loads the LM on first call (only when some cell needs it)


class Evaluator:
    """A family of Table-1 cells (e.g. the linear probes on the LM's features, or zero-shot completion).

    The program builds each enabled family once per run (:meth:`enabled`, then ``Evaluator(config, workdir)``),
    checks it against every task's data before any model loads (:meth:`check`), and for each task computes the
    extractions every family declares (:meth:`extractions`) in one pass over the texts, then logs every cell
    :meth:`cells` yields, each as soon as it is yielded (a later cell may read an earlier one from the log).
    Its table columns (:meth:`columns`), its entries in a task's description (:meth:`describe`) and in
    ``results.json`` (:meth:`results`) complete the run's outputs.
    """

    def __init__(self, config, workdir: Path):
        self.config = config
        self.workdir = workdir

    @staticmethod
    def enabled(config) -> bool:
        return True

    def columns(self) -> list[str]:
        """The table columns this family fills, in table order."""
        return []

    def check(self, datas: Sequence[TaskData]) -> None:
        """Refuses, before any model pass, what the data already shows cannot run (raises SentcompError)."""

    def extractions(self, data: TaskData, log: CellLog, load_model: ModelLoader) -> list[RowRequest]:
        """The feature extractions (over ``data.texts`` or some of them) that :meth:`cells` will ask for, declared
        so that the program reads each text once for every family's rows (:func:`sentcomp.features.extract_rows`)
        before any cell, and :meth:`cells` finds them cached. None by default; call ``load_model`` only when
        something is missing."""
        return []

    def cells(self, data: TaskData, log: CellLog, load_model: ModelLoader) -> Iterator[dict]:
        """Each cell of ``data`` not yet in ``log``, as it is computed."""
        raise NotImplementedError(f"{type(self).__name__} yields no cells: implement Evaluator.cells")

    def describe(self, data: TaskData) -> dict:
        """Entries of the task's description in results.json."""
        return {}

    def results(self, datas: Sequence[TaskData], log: CellLog, table: dict[str, dict[str, dict]]) -> dict:
        """Entries of results.json beyond the table (``table``: :func:`sentcomp.evaluators.cells.summarise`)."""
        return {}
