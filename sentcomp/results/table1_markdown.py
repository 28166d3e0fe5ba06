"""Table 1's ``results.md``, from its ``results.json`` dict: the accuracy table laid out like the paper's, every
accuracy with its 95% Wilson interval, the probes' macro-F1, the zero-shot sections, the prompt-row probe
variants, then data sizes, words, each probe's chosen regularisation and the run's timings."""

from __future__ import annotations

from collections.abc import Sequence

from sentcomp.results import layout
from sentcomp.results.statistics import wilson_interval
from sentcomp.results.tables import markdown_table

COLUMN_TITLES = {
    "f": "f(s)",
    "phi_p_f": "Φp_f(s)",
    "subset_logits": "subset logits",
    "subset_log_probs": "subset log-probs",
    "subset_probs": "subset probs",
    "class_logits": "class-word logits",
    "posneg_logits": "pos/neg logits",
    "p_f": "p_f(s)",
    "projected_p_f": "A p_f(s)",
    "bert": "BERT",
    "finetune": "fine-tune",
    "zeroshot": "zero-shot",
}
RULE_TITLES = {"ll": "log-likelihood", "acc_norm": "acc_norm (÷ characters)", "pmi": "PMI (template alone)",
               "calibrated": "contextual calibration"}


def format_accuracy(entry: dict | None, n_test: int | None = None) -> str:
    """``85.3`` (percent), ``85.3 ± 1.2`` over several splits, ``—`` when the cell does not apply; with
    ``n_test``, followed by the 95% Wilson interval ``[82.0, 88.1]`` of the accuracy over all the cell's test
    predictions (``n_test`` per split, pooled)."""
    if entry is None:
        return "—"
    text = f"{100 * entry['mean']:.1f}"
    text = text + f" ± {100 * entry['std']:.1f}" if entry["n_splits"] > 1 else text
    if not n_test:
        return text
    trials = n_test * entry["n_splits"]
    low, high = wilson_interval(entry["mean"] * trials, trials)
    return f"{text} [{100 * low:.1f}, {100 * high:.1f}]"


def accuracy_table(table: dict[str, dict[str, dict]], rows: Sequence[str], columns: Sequence[str],
                   n_test: dict[str, int] | None = None) -> str:
    """The paper-like table: one row per ``task`` / ``task*``, one column per feature kind (+ zero-shot; a column
    without a title in :data:`COLUMN_TITLES` is headed by its name); with ``n_test`` (row -> test examples per
    split), every accuracy gets its 95% interval."""
    n_test = n_test or {}
    return markdown_table(["task", *(COLUMN_TITLES.get(c, c) for c in columns)],
                          ([row, *(format_accuracy(table.get(row, {}).get(c), n_test.get(row)) for c in columns)]
                           for row in rows))


def probe_modes(probe_config: dict) -> str:
    """``"ovr"``, or ``"ovr; multinomial for sst5:subset_logits, …"`` when some cells are exceptions."""
    if probe_config.get("protocol") == "mteb":
        return "multinomial (MTEB)"
    exceptions = probe_config.get("multinomial_cells", ())
    return probe_config["multi_class"] + (f"; multinomial for {', '.join(exceptions)}" if exceptions else "")


def cv_convergence(cell: dict) -> str:
    """``"0 / 40"``, or ``"⚠ 3 / 40"`` when some cross-validation fit did not converge."""
    missed, fits = cell.get("cv_not_converged", 0), cell.get("cv_fits", 0)
    return f"{'⚠ ' if missed else ''}{missed} / {fits}"


def zeroshot_markdown(summary: dict, tasks: Sequence[dict]) -> list[str]:
    """The zero-shot sections: scoring rules × k, prompt sensitivity, templates and verbalizers."""
    def interval(entry):
        spread = f" ± {100 * entry['std']:.1f}" if entry["n_splits"] > 1 else ""
        return f"{100 * entry['mean']:.1f}{spread} [{100 * entry['low']:.1f}, {100 * entry['high']:.1f}]"

    return [
        "## Zero- and few-shot scoring rules",
        markdown_table(["task", "k", "rule", "accuracy", "ECE", "Brier"],
                       ([e["row"], e["k"], RULE_TITLES[e["rule"]], interval(e), f"{e['ece']:.3f}", f"{e['brier']:.3f}"]
                        for e in summary["rules"])),
        "Sentence completion with each task's first template and verbalizer, after k seeded demonstrations from "
        "train (docs/zeroshot.md). Accuracy (%) [95% Wilson interval]; ECE (10 equal-width bins of the top "
        "probability) and multi-class Brier score of the softmax over the labels' scores.",
        "## Prompt sensitivity",
        markdown_table(["task", "k", "rule", "mean", "min", "max", "best", "variants"],
                       ([e["row"], e["k"], RULE_TITLES[e["rule"]], f"{100 * e['mean']:.1f}", f"{100 * e['min']:.1f}",
                         f"{100 * e['max']:.1f}", e["best"], len(e["accuracies"])] for e in summary["sensitivity"])),
        "Zero-shot accuracy (%) over every template × verbalizer (`tT/vV`, listed below).",
        markdown_table(["task", "templates", "verbalizers"],
                       ([t["name"], "; ".join(f"t{i}: {template!r}" for i, template in enumerate(t["templates"])),
                         "; ".join(f"v{i}: " + " / ".join(",".join(words) for words in verbalizer.values())
                                   for i, verbalizer in enumerate(t["verbalizers"]))] for t in tasks)),
    ]


def probe_variants_markdown(entries: Sequence[dict]) -> list[str]:
    """The prompt-row probes under other templates and after a k-shot prefix (``config.prompt_probes``)."""
    rows = list(dict.fromkeys(row for entry in entries for row in entry["accuracies"]))
    return [
        "## Prompt-row probes: templates and k-shot prefix",
        markdown_table(["task", "column", *rows, "mean", "min", "max"],
                       ([e["task"], COLUMN_TITLES[e["column"]],
                         *(f"{100 * e['accuracies'][row]:.1f}" if row in e["accuracies"] else "—" for row in rows),
                         f"{100 * e['mean']:.1f}", f"{100 * e['min']:.1f}", f"{100 * e['max']:.1f}"]
                        for e in entries)),
        "Test accuracy (%) of each probe with the task's prompt (`task*`), each other template (`task*tT`, the "
        "templates of the prompt-sensitivity table) and after a k-shot prefix (`task*kK`; its demonstrations are "
        "left out of the probe's training set); mean, min and max over the templates (k-shot row excluded).",
    ]


def timings_markdown(record: dict) -> list[str]:
    """The cost section: each part's wall seconds and XLA compilations (:mod:`sentcomp.results.timings`)."""
    rows = [*record["parts"], {"part": "total", **record["total"]}]
    return [
        "## Timings",
        markdown_table(["part", "seconds", "compilations", "compile s", "from the compilation cache"],
                       ([entry["part"], f"{entry['seconds']:.1f}", entry["compilations"],
                         f"{entry['compile_seconds']:.1f}", entry["cache_hits"]] for entry in rows)),
        f"Wall time of this run's parts (parts resumed from an earlier run are not run, so not listed); load "
        f"average (1, 5, 15 min) at the end: {', '.join(str(x) for x in record['load_average'])}; float32 2048² "
        f"matmul rate at the end (or less than a minute before): {record.get('float32_matmul_gflops', '?')} GFLOP/s; "
        "compilation cache: "
        f"{record['compilation_cache'] or 'off'}.",
    ]


def results_markdown(results: dict) -> str:
    """results.md: the accuracy table, macro-F1, the zero-shot sections (when run), data, words and probes."""
    rows = [row for task in results["tasks"] for row in (task["name"], task["name"] + "*")]
    n_test = {row: task["n_test"] for task in results["tasks"] for row in (task["name"], task["name"] + "*")}
    f1_columns = [c for c in results["columns"] if any(c in entries for entries in results["macro_f1"].values())]
    parts = [
        f"# Table 1: linear probes on {results['model']} features",
        accuracy_table(results["table"], rows, results["columns"], n_test),
        f"Test accuracy (%) [95% Wilson interval over the test predictions]. `task*`: the task's prompt appended "
        f"to every text. Probe protocol `{results['probe']['protocol']}` ({probe_modes(results['probe'])}); mean "
        "± std over the splits of tasks without an official split (their interval pools every split's "
        "predictions, which overlap across splits: read it as indicative). Zero-shot: sentence completion with "
        "the label words (prompt rows only).",
        f"![Test accuracy with 95% Wilson intervals]({layout.RESULTS_FIGURE})",
        "## Macro-F1",
        accuracy_table(results["macro_f1"], rows, f1_columns),
        "Test macro-F1 (%) of the same probes (the mean over classes of each class's F1).",
        *(zeroshot_markdown(results["zeroshot"], results["tasks"]) if "zeroshot" in results else []),
        *(probe_variants_markdown(results["probe_variants"]) if "probe_variants" in results else []),
        "## Data",
        markdown_table(["task", "N train", "N test", "splits", "prompt", "label words", "truncated texts"],
                       ([t["name"], t["n_train"], t["n_test"], t["n_splits"], repr(t["prompt"]),
                         "; ".join(f"{k}: {', '.join(v)}" for k, v in t["label_words"].items()),
                         t.get("n_truncated", "")] for t in results["tasks"])),
        "## Words",
        markdown_table(["task", "set", "kept (single-token forms)", "dropped"],
                       ([t["name"], group, " ".join(repr(f) for f in ws["forms"]), ", ".join(ws["dropped"]) or "—"]
                        for t in results["tasks"] for group, ws in t["word_sets"].items())),
        "## Probes",
        markdown_table(["cell", "regularisation", "train acc", "test acc", "features", "converged",
                        "CV fits not converged"],
                       ([c["key"], f"{c['regularisation_name']}={c['regularisation']:g}",
                         f"{100 * c['train_accuracy']:.1f}", f"{100 * c['test_accuracy']:.1f}", c["n_features"],
                         c["converged"], cv_convergence(c)] for c in results["cells"] if "regularisation" in c)),
        "`converged`: the final probe's fit; the last column counts the cross-validation fits that chose the "
        "regularisation and stopped short of their tolerance (⚠ when any did: raise `probe.max_iter`).",
        *(timings_markdown(results["timings"]) if "timings" in results else []),
    ]
    return "\n\n".join(parts) + "\n"
