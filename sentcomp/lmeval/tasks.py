"""lm-evaluation-harness multiple-choice tasks as sentcomp tasks: ``task="lmeval:<name>"`` or
``task="lmeval:<path/to/task.yaml>"`` in experiments/table1.py (or anywhere :func:`sentcomp.data.get_task` is used).

How an lm-eval task becomes a :class:`sentcomp.data.Task` (zero-shot view: no description, no few-shot context;
Table 1 builds its own k-shot prefixes):

- **documents → texts**: each document's ``doc_to_text`` (after the task's ``process_docs``) is split into the
  document's text and the **prompt**, the longest suffix every rendered document shares, moved forward to start at
  a whitespace (``"{{text}} This movie is"`` → text, prompt ``" This movie is"``); the prompt is that suffix plus the
  task's ``target_delimiter``, so sentcomp's zero-shot request (``text + prompt.rstrip()``, then the trailing
  whitespace and a label word) is exactly lm-eval's ``(doc_to_text, target_delimiter + choice)`` after lm-eval moves
  the context's trailing whitespace into the continuation;
- **doc_to_choice → verbalizer**: the choices, the same for every document, are the label names and each label's one
  word (also the word-subset and class-word sets of the paper's word features);
- **doc_to_target → labels** (an index into the choices, or a choice);
- **splits**: ``training_split`` → ``train``; ``test_split``, else ``validation_split`` → ``test``.

Refused with the reason: output types other than ``multiple_choice`` (generation, perplexity), tasks without a
training split (the probes need one), per-document choices (e.g. HellaSwag's endings: no fixed verbalizer),
multiple-input tasks, and templates whose choices or delimiter do not fit the ``text + prompt + " " + word`` shape.

The documents are written once as JSON lines (``{"text", "label"}``) under ``$SENTCOMP_CACHE/lmeval_tasks/<hash>/``
and read by sentcomp's own file loader, so every later step (subsets, repeats, caches) is unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from lm_eval.tasks import TaskManager, get_task_dict
from lm_eval.tasks._yaml_loader import load_yaml

from sentcomp.data.tasks import TASKS, Task
from sentcomp.errors import SentcompError
from sentcomp.models.tokenizers import sentcomp_cache_dir
from sentcomp.results.storage import content_hash, write_text

PREFIX = "lmeval:"  # task names sentcomp resolves through lm-eval (sentcomp.data.tasks.get_task)


def is_lmeval_name(name: str) -> bool:
    return name.startswith(PREFIX)


def load_lmeval_task(spec: str):
    """lm-eval's task object for ``spec`` (a task name lm-eval knows, or the path of a local task YAML, whose folder
    alone is searched: its tasks may include files beside it, not lm-eval's own tasks)."""
    path = Path(spec).expanduser()
    if spec.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise SentcompError(f"lm-eval task file {spec} does not exist.")
        name = load_yaml(path, resolve_func=False).get("task")
        if not isinstance(name, str):
            raise SentcompError(f"{spec} names no single task ('task: <name>'); groups are not one sentcomp task.")
        manager = TaskManager(include_path=str(path.parent), include_defaults=False)  # not lm-eval's own thousands
    else:
        name, manager = spec, TaskManager()
    if name not in manager.all_tasks:
        raise SentcompError(f"lm-eval knows no task {name!r}; pass a registered name or the path of a task YAML.")
    tasks = get_task_dict([name], manager)
    if len(tasks) != 1 or not hasattr(next(iter(tasks.values())), "doc_to_choice"):
        raise SentcompError(f"lm-eval task {name!r} is a group of {len(tasks)} tasks; name one of its tasks.")
    return next(iter(tasks.values()))


def shared_prompt(rendered: list[str]) -> str:
    """The longest suffix all ``rendered`` texts share, from its first whitespace on (so no text loses part of a
    word), and leaving every text at least one character: ``""`` if there is none."""
    shortest = min(len(text) for text in rendered)
    length = 0
    while length < shortest - 1 and len({text[-length - 1] for text in rendered}) == 1:
        length += 1
    suffix = rendered[0][len(rendered[0]) - length:] if length else ""
    start = next((i for i, char in enumerate(suffix) if char.isspace()), len(suffix))
    return suffix[start:]


def _documents(task, split: str):
    docs = {"train": task.training_docs, "validation": task.validation_docs, "test": task.test_docs}[split]()
    return list(docs)


def task_from_lmeval(spec: str) -> tuple[Task, dict[str, list[dict]]]:
    """The sentcomp :class:`Task` for lm-eval task ``spec`` (module docstring), and its rows ``{split: [{"text",
    "label"}]}``."""
    task = load_lmeval_task(spec)
    where = f"lm-eval task {spec!r}"
    if task.OUTPUT_TYPE != "multiple_choice":
        raise SentcompError(f"{where} has output_type {task.OUTPUT_TYPE!r}; Table 1 takes multiple_choice tasks only "
                            "(a label per document, its choices as the verbalizer).")
    if task.multiple_input:
        raise SentcompError(f"{where} puts its choices in the context (multiple input); Table 1 needs one text per "
                            "document and the choices as continuations.")
    if not task.has_training_docs():
        raise SentcompError(f"{where} has no training split (training_split); the probes of Table 1 are trained on "
                            "one. Add training_split to the task's YAML if its dataset has one.")
    test_split = "test" if task.has_test_docs() else "validation" if task.has_validation_docs() else None
    if test_split is None:
        raise SentcompError(f"{where} has neither a test nor a validation split to evaluate on.")
    documents = {"train": _documents(task, "train"), "test": _documents(task, test_split)}
    for split, docs in documents.items():
        if not docs:
            raise SentcompError(f"{where}: its {split} split has no documents.")
    choices: list[str] = list(task.doc_to_choice(documents["train"][0]))
    rendered: dict[str, list[str]] = {}
    labels: dict[str, list[int]] = {}
    for split, docs in documents.items():
        rendered[split], labels[split] = [], []
        for index, doc in enumerate(docs):
            text, doc_choices, target = task.doc_to_text(doc), list(task.doc_to_choice(doc)), task.doc_to_target(doc)
            if doc_choices != choices:
                raise SentcompError(f"{where}: {split} document {index} has choices {doc_choices}, not {choices}; "
                                    "Table 1 needs the same choices for every document (a fixed verbalizer).")
            if not isinstance(text, str):
                raise SentcompError(f"{where}: doc_to_text gives {type(text).__name__}, not a string.")
            label = choices.index(target) if isinstance(target, str) and target in choices else target
            if not isinstance(label, int) or not 0 <= label < len(choices):
                raise SentcompError(f"{where}: {split} document {index} has target {target!r}, neither a choice of "
                                    f"{choices} nor an index into them.")
            rendered[split].append(text)
            labels[split].append(label)
    all_rendered = rendered["train"] + rendered["test"]
    suffix = shared_prompt(all_rendered)
    prompt = suffix + task.config.target_delimiter
    if len(set(choices)) != len(choices) or any(not c.strip() or c != c.strip() for c in choices):
        raise SentcompError(f"{where}: choices {choices} must be distinct words without surrounding whitespace "
                            "(the verbalizer; lm-eval's target_delimiter supplies the space).")
    if prompt == prompt.rstrip():
        raise SentcompError(f"{where}: the context and target_delimiter {task.config.target_delimiter!r} leave no "
                            "whitespace before the choice; sentcomp scores a label word after whitespace.")
    rows = {split: [{"text": text[: len(text) - len(suffix)], "label": label}
                    for text, label in zip(rendered[split], labels[split])] for split in documents}
    sentcomp_task = Task(
        name=PREFIX + spec, label_names=tuple(choices), prompt=prompt,
        label_words={choice: (choice,) for choice in choices}, subset_words=tuple(choices),
        class_words=tuple(choices), splits=("train", "test"),
        description=f"lm-eval task {task.config.task} ({test_split} split as test; prompt {prompt!r}).",
    )
    return sentcomp_task, rows


def register_lmeval_task(name: str) -> Task:
    """Builds the task for ``name`` (``"lmeval:<name or YAML>"``), writes its rows as JSON lines under the sentcomp
    cache (``$SENTCOMP_CACHE/lmeval_tasks/<hash of the rows>/``) and registers it in ``sentcomp.data.TASKS``."""
    if not is_lmeval_name(name):
        raise SentcompError(f"{name!r} is not an lm-eval task name (they start with {PREFIX!r}).")
    task, rows = task_from_lmeval(name[len(PREFIX):])
    folder = sentcomp_cache_dir() / "lmeval_tasks" / content_hash(name, rows)
    os.makedirs(folder, exist_ok=True)
    files = {}
    for split, split_rows in rows.items():
        files[split] = str(folder / f"{split}.jsonl")
        write_text(files[split], "".join(json.dumps(row) + "\n" for row in split_rows))
    task = dataclasses.replace(task, files=files)
    TASKS[task.name] = task
    return task
