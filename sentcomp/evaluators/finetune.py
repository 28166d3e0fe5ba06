"""The fine-tuning column (``config.ft``, off by default): the LM + a linear head on the last token trained end to
end (:func:`sentcomp.training.finetune.finetune_accuracy`), on both rows, each run in its own resumable workdir
``workdir/finetune/<row>-<split>``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sentcomp.data.tasks import Task
from sentcomp.evaluators.base import Evaluator, ModelLoader
from sentcomp.evaluators.cells import CellLog, cell_key
from sentcomp.evaluators.task_data import TaskData

if TYPE_CHECKING:  # the training package (optax, Orbax) loads only when a fine-tuning cell runs
    from sentcomp.training.finetune import FinetuneOptions

FINETUNE = "finetune"


def finetune_config(config, n_train: int, prompt: str | None) -> FinetuneOptions:
    """:func:`sentcomp.training.finetune.finetune_accuracy`'s options from ``config.ft`` (``num_epochs`` > 0 sets
    ``max_steps`` = ⌈epochs · N_train / batch⌉)."""
    from sentcomp.training.finetune import FinetuneOptions

    ft = config.ft.to_dict()
    ft.pop("enabled")
    epochs = ft.pop("num_epochs", 0)
    if epochs > 0:
        ft["max_steps"] = max(1, -(-int(epochs * n_train) // ft.get("batch_size", FinetuneOptions.batch_size)))
    return FinetuneOptions.from_mapping({"prompt": prompt, "max_length": config.max_length, "seed": config.seed, **ft})


def finetune_cells(config, task: Task, pairs, prompt: str | None, workdir: Path, lm_loader,
                   log: CellLog) -> Iterable[dict]:
    """Cells of the fine-tuning column, one per split not yet in ``log``."""
    from sentcomp.training.finetune import finetune_accuracy

    row = task.name + ("*" if prompt is not None else "")
    for repeat, (train, test) in enumerate(pairs):
        key = cell_key(task.name, prompt is not None, FINETUNE, repeat)
        if key in log:
            continue
        result = finetune_accuracy(lm_loader(), train, test, finetune_config(config, len(train), prompt),
                                   workdir / "finetune" / f"{row}-{repeat}")
        yield {"key": key, "row": row, "column": FINETUNE, "repeat": repeat, **result}


class FineTuneColumn(Evaluator):
    @staticmethod
    def enabled(config) -> bool:
        return config.ft.enabled

    def columns(self) -> list[str]:
        return [FINETUNE]

    def cells(self, data: TaskData, log: CellLog, load_model: ModelLoader) -> Iterator[dict]:
        for prompt in (None, data.task.prompt):
            yield from finetune_cells(self.config, data.task, data.pairs, prompt, self.workdir, load_model, log)
