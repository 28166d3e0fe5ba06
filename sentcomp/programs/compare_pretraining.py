"""Comparing pretraining losses downstream: one table and two figures from finished pretraining + Table-1 runs.

The last stage of ``experiments/quad_vs_xent.py`` (a composed config); its config is just the runs to read::

    program = "sentcomp.programs.compare_pretraining"
    pretrain_runs = ("stage:pretrain_xent", "stage:pretrain_quad")   # or any finished pretraining workdirs
    table1_runs = ("stage:table1_xent", "stage:table1_quad")         # the Table-1 run of each, same order

``run(config, workdir)`` reads only the records of other runs, never their code: for each model ``i``,
``config.pretrain_runs[i]`` (a :mod:`sentcomp.programs.pretrain` workdir: ``results.json``, ``metrics.jsonl``) and
``config.table1_runs[i]`` (a :mod:`sentcomp.programs.table1` workdir on that model: ``results.json``). A model is
labelled by its pretraining loss (``xent``, ``quad``; a second run with the same loss gets ``#2``...).

Writes ``results.json`` and ``results.md``: **one table**, a row per (loss, feature column), a column per Table-1
row (``task`` = text alone, ``task*`` = with the task's prompt), then the model's validation cross-entropy
``ℓ_xent = E[log Z(f(s)) − f(s)ᵀφ_w]``, validation Quad loss ``ℓ_quad = E[−f(s)ᵀφ_w + ½‖Φᵀf(s)‖²]`` and training
throughput (tokens/s over the train steps after the first evaluation window, whose time includes compilation:
``Σ Δtokens / Σ (Δtokens / tokens_per_s)`` over the later windows of ``metrics.jsonl``). Feature columns other than
``f`` of a Quad model are marked: Quad does not train ``p_f = softmax(Φᵀf)``, so ``Φp_f`` and word-subset
features are not the paper's features for it (its ``f(s)`` is; at the Quad optimum ``Φᵀf(s)`` is a linear
estimate of ``p*(.|s)``, so its word "logits" estimate probabilities).

It also checks, from the pretraining runs' records, that every model read the same token stream (the
``data_stream_sha256`` of ``results.json``: same blocks in the same order, same token budget) and that their
``config.json`` differ only in ``loss``, and says so.

Figures (from the pretraining runs' in-loop probe, ``probe_*`` columns of ``metrics.jsonl``):
``accuracy_vs_tokens.png`` (probe test accuracy against training tokens) and ``accuracy_vs_val_xent.png`` (against
validation cross-entropy, the relation the paper's theorem bounds), one panel per probed feature, a line per model.

The headline (the composed run's, so a sweep can pick its best point per loss by validation loss):
``<label>/val_loss`` (the model's own loss on validation), ``<label>/val_xent``, ``<label>/val_quad``,
``<label>/tokens_per_s``, ``<label>/<row>/<column>`` (test accuracy), ``same_token_stream`` and
``same_pretraining_config``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sentcomp import parallel
from sentcomp.errors import SentcompError
from sentcomp.results import layout, plots, storage
from sentcomp.results.tables import markdown_table
from sentcomp.training.tracking import read_metrics

FIGURES = {"tokens": "accuracy_vs_tokens.png", "val_xent": "accuracy_vs_val_xent.png"}
AXIS_TITLES = {"tokens": "training tokens", "val_xent": "validation cross-entropy (nats/token)"}
FEATURE_TITLES = {"f": "f(s)", "phi_p_f": "Φp_f(s)", "subset_logits": "subset logits",
                  "subset_log_probs": "subset log-probs", "class_logits": "class-word logits",
                  "posneg_logits": "pos/neg logits", "zeroshot": "zero-shot"}
PAPER_FEATURES = {"xent": None, "quad": ("f",)}  # loss -> the feature columns the paper uses (None: all of them)


def read_json(directory: Path, name: str, what: str) -> dict[str, Any]:
    """``directory/name`` as a dict, or a SentcompError saying which run is missing and how to produce it."""
    path = Path(directory) / name
    if not path.is_file():
        raise SentcompError(f"{path} does not exist: the {what} run in {directory} has not finished. Run it first "
                            "(in a composed config: an earlier stage).")
    return json.loads(path.read_text())


def training_throughput(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Tokens per second of the train steps, ``Σ Δtokens / Σ (Δtokens / tokens_per_s)`` over the evaluation
    windows of ``metrics.jsonl`` rows after the first (whose time includes compilation), or over the only one."""
    windows, previous = [], 0
    for row in rows:
        if "tokens_per_s" in row and row["tokens"] > previous:
            windows.append((row["tokens"] - previous, row["tokens_per_s"]))
            previous = row["tokens"]
    windows = windows[1:] or windows
    if not windows:
        return None
    return sum(tokens for tokens, _ in windows) / sum(tokens / speed for tokens, speed in windows)


def model_labels(losses: Sequence[str]) -> list[str]:
    """Each model's loss as its label, ``loss#2``, ``loss#3``... for repeated losses."""
    seen: dict[str, int] = {}
    labels = []
    for loss in losses:
        seen[loss] = seen.get(loss, 0) + 1
        labels.append(loss if seen[loss] == 1 else f"{loss}#{seen[loss]}")
    return labels


def model_record(pretrain_dir: Path, table1_dir: Path) -> dict[str, Any]:
    """What the comparison needs from one model's pretraining and Table-1 runs."""
    pretrain = read_json(pretrain_dir, layout.RESULTS_FILE, "pretraining")
    table1 = read_json(table1_dir, layout.RESULTS_FILE, "Table-1")
    metrics = read_metrics(Path(pretrain_dir))
    return {
        "loss": pretrain["loss"], "pretrain_dir": str(pretrain_dir), "table1_dir": str(table1_dir),
        "steps": pretrain["steps"], "tokens": pretrain["tokens"], "epochs": pretrain.get("epochs"),
        "pretrain_config": read_json(pretrain_dir, layout.CONFIG_FILE, "pretraining"),
        "val_xent": pretrain["val_xent"], "val_quad": pretrain["val_quad"], "val_loss": pretrain["val_loss"],
        "tokens_per_s": training_throughput(metrics), "data_stream_sha256": pretrain.get("data_stream_sha256"),
        "table": table1["table"], "columns": table1["columns"],
        "rows": [row for task in table1["tasks"] for row in (task["name"], task["name"] + "*")],
        "curve": [{k: v for k, v in row.items() if k in ("step", "tokens", "val_xent", "val_quad")
                   or k.startswith("probe_")} for row in metrics],
    }


def config_differences(records: Sequence[Mapping[str, Any]], allowed: Sequence[str] = ("loss",)) -> list[str]:
    """Dotted keys, other than ``allowed``, whose value differs between the pretraining runs' recorded configs
    (``config.json``): empty when the models differ only in their loss."""
    flat = [storage.flatten(record["pretrain_config"]) for record in records]
    keys = dict.fromkeys(key for config in flat for key in config)
    return [key for key in keys if key not in allowed and len({json.dumps(c.get(key)) for c in flat}) > 1]


def same_stream(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every model read the same token stream (equal, recorded ``data_stream_sha256``)."""
    digests = {record["data_stream_sha256"] for record in records}
    return len(digests) == 1 and None not in digests


def is_paper_feature(loss: str, column: str) -> bool:
    """Whether ``column`` is one of the features the paper uses for a model trained with ``loss``."""
    wanted = PAPER_FEATURES.get(loss)
    return wanted is None or column in wanted


def comparison_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """The Markdown table: a row per (model, feature column), a column per Table-1 row, then the validation
    losses and throughput of the model (test accuracy in %, ``—`` where a cell does not apply)."""
    rows = list(dict.fromkeys(row for record in models.values() for row in record["rows"]))
    lines = []
    for label, record in models.items():
        for column in record["columns"]:
            mark = "" if is_paper_feature(record["loss"], column) else " †"
            cells = [record["table"].get(row, {}).get(column) for row in rows]
            speed = record["tokens_per_s"]
            lines.append([label, FEATURE_TITLES.get(column, column) + mark,
                          *("—" if cell is None else f"{100 * cell['mean']:.1f}" for cell in cells),
                          f"{record['val_xent']:.3f}", f"{record['val_quad']:.4g}",
                          "—" if speed is None else f"{speed:,.0f}"])
    return markdown_table(["loss", "features", *rows, "val xent", "val Quad", "tokens/s"], lines)


def headline(models: Mapping[str, Mapping[str, Any]], same: bool, differences: Sequence[str]) -> dict[str, Any]:
    """Flat scalars for done.json (and a sweep's table): per model its validation losses, throughput and every
    test accuracy, plus whether the token streams were identical and the pretraining configs differ only in
    their loss."""
    out: dict[str, Any] = {"same_token_stream": same, "same_pretraining_config": not differences}
    for label, record in models.items():
        out.update({f"{label}/{key}": record[key] for key in ("val_loss", "val_xent", "val_quad", "tokens_per_s")
                    if record[key] is not None})
        out.update({f"{label}/{row}/{column}": cell["mean"] for row, cells in record["table"].items()
                    for column, cell in cells.items()})
    return out


def accuracy_figure(models: Mapping[str, Mapping[str, Any]], x: str, path: Path, title: str) -> Path | None:
    """In-loop probe accuracy (%) against ``x`` (a metrics column): a panel per probed feature, a line per model;
    None when no run logged a probe."""
    probes = list(dict.fromkeys(key for record in models.values() for row in record["curve"] for key in row
                                if key.startswith("probe_")))
    if not probes:
        return None
    figure, axes = plots.panel_grid(len(probes), width=4.5, height=3.4)
    for axis, probe in zip(axes, probes):
        for label, record in models.items():
            points = sorted((row[x], 100 * row[probe]) for row in record["curve"]
                            if plots.is_number(row.get(x)) and plots.is_number(row.get(probe)))
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        feature = probe.removeprefix("probe_")
        axis.set_title(f"{FEATURE_TITLES.get(feature, feature)} probe", fontsize=9)
        axis.set_xlabel(AXIS_TITLES[x], fontsize=8)
        axis.set_ylabel("test accuracy (%)", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return plots.save(figure, path, title)


def results_markdown(models: Mapping[str, Mapping[str, Any]], same: bool, differences: Sequence[str],
                     figures: Sequence[str]) -> str:
    first = next(iter(models.values()))
    stream = ("identical for every model (same blocks, same order, same budget)" if same else
              "**NOT identical** (or not recorded): the models did not read the same data; compare with care")
    configs = ("differ only in the loss" if not differences else
               f"**differ in more than the loss**: {', '.join(differences)}")
    parts = [
        "# Pretraining losses compared downstream",
        comparison_table(models),
        "Test accuracy (%) of a linear probe (the Table-1 runs' protocol) on each model's features; `task*`: with "
        "the task's prompt. val xent / val Quad: the model's validation cross-entropy (nats/token) and Quad loss; "
        "tokens/s: training throughput after the first evaluation window. † not the paper's feature for a Quad "
        "model (Quad does not train p_f = softmax(Φᵀf); its f(s) is the paper's feature).",
        f"Each model: {first['steps']} steps, {first['tokens']:,} training tokens. Token streams: {stream}. "
        f"Pretraining configs: {configs}.",
        markdown_table(["loss", "pretraining run", "Table-1 run", "steps", "tokens", "epochs"],
                       ([label, r["pretrain_dir"], r["table1_dir"], r["steps"], f"{r['tokens']:,}",
                         "—" if r["epochs"] is None else f"{r['epochs']:.2f}"] for label, r in models.items())),
        *(f"![{name}]({name})" for name in figures),
    ]
    return "\n\n".join(parts) + "\n"


def check_config(config) -> None:
    """One Table-1 run per pretraining run (checked before the workdir is claimed)."""
    if len(config.pretrain_runs) != len(config.table1_runs) or not config.pretrain_runs:
        raise SentcompError(f"config.pretrain_runs and config.table1_runs must pair one Table-1 run with each "
                            f"pretraining run; got {len(config.pretrain_runs)} and {len(config.table1_runs)}.")


def run(config, workdir) -> dict[str, Any]:
    """Reads the runs of ``config.pretrain_runs`` / ``config.table1_runs`` (paired by position); writes
    results.json, results.md and the figures; returns the headline."""
    check_config(config)
    workdir = Path(workdir)
    records = [model_record(Path(p), Path(t)) for p, t in zip(config.pretrain_runs, config.table1_runs)]
    models = dict(zip(model_labels([record["loss"] for record in records]), records))
    same, differences = same_stream(records), config_differences(records)
    figures = []
    if parallel.is_main_process():
        for x, name in FIGURES.items():
            if accuracy_figure(models, x, workdir / name, f"in-loop probe accuracy vs {AXIS_TITLES[x]}"):
                figures.append(name)
        results = {"models": models, "same_token_stream": same, "config_differences": differences, "figures": figures,
                   "paper_features": {loss: list(cols) if cols else "all" for loss, cols in PAPER_FEATURES.items()}}
        storage.write_json(workdir / layout.RESULTS_FILE, results)
        markdown = results_markdown(models, same, differences, figures)
        storage.write_text(workdir / layout.RESULTS_MARKDOWN, markdown)
        print(markdown)
    return headline(models, same, differences)
