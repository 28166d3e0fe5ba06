"""Zero- and few-shot scoring (issue 23): every scoring rule against log-probabilities summed by hand from a tiny
random GPT-2's logits in float64 numpy (real GPT-2 tokenizer), k-shot demonstrations, ECE/Brier on hand examples,
and the Table-1 program's zero-shot sections."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentcomp import parallel, probe, zeroshot
from sentcomp.data import get_task, task_from_config
from sentcomp.data.text import demonstration_prefix, encode_texts, sample_demonstrations
from sentcomp.errors import SentcompError
from sentcomp.evaluators import cells as cells_log
from sentcomp.evaluators import task_data
from sentcomp.evaluators import zeroshot as zeroshot_column
from sentcomp.launcher import runner
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config, load_sweep, override
from sentcomp.models import gpt2
from sentcomp.models.tokenizers import gpt2_tokenizer
from sentcomp.programs import table1
from sentcomp.results import layout, statistics

TEXTS = ["A gorgeous, witty, seductive movie.", "Dull.", "An uneven but often charming debut",
         "I laughed; I cried; I checked my watch."]
# Multi-token words and several words per label.
TASK = task_from_config({
    "name": "fewshot_toy", "label_names": ["negative", "positive"], "prompt": " This movie is ",
    "label_words": {"negative": ["terrible", "not worth it"], "positive": ["great", "a must see"]},
})
LENGTH = 96  # the reference runs every sequence right-padded to this length: one compilation


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tokenizer = gpt2_tokenizer(cache_dir=tmp_path_factory.mktemp("gpt2-tokenizer"))
    return gpt2.init(gpt2.gpt2_config(n_embd=32, n_layer=2, n_head=2, n_positions=LENGTH), rng=3, tokenizer=tokenizer)


def _log_softmax(logits):
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _hand_word_scores(lm, texts, prompt, words):
    """``Σ_t log p(c_t | context, c_<t)`` per text and word: GPT-2 has no prefix token; the context is
    ``text + prompt.rstrip()``, the continuation the tokens of ``text + prompt + word`` after it; logits
    ``f(s)ᵀΦ`` and their log-softmax in float64, one causal (right-padded) sequence at a time."""
    phi = np.asarray(lm.phi, np.float64)
    scores = np.zeros((len(texts), len(words)))
    for i, text in enumerate(texts):
        context = lm.tokenizer.encode(text + prompt.rstrip())
        for j, word in enumerate(words):
            continuation = lm.tokenizer.encode(text + prompt + word)[len(context):]
            sequence = context + continuation[:-1]
            ids = np.zeros((1, LENGTH), np.int32)
            ids[0, :len(sequence)] = sequence
            mask = (np.arange(LENGTH) < len(sequence)).astype(np.int32)[None]
            hidden = np.asarray(lm.hidden(jnp.asarray(ids), jnp.asarray(mask)), np.float64)[0]
            log_p = _log_softmax(hidden @ phi.T)
            scores[i, j] = sum(log_p[len(context) - 1 + t, token] for t, token in enumerate(continuation))
    return scores


def _labels_of(word_scores, word_labels):
    return np.stack([np.log(np.exp(word_scores[..., word_labels == y]).sum(-1)) for y in (0, 1)], axis=-1)


@pytest.mark.parametrize("k", [0, 2])
def test_every_rule_matches_hand_computed_log_probs(lm, k):
    """ll, acc_norm (÷ characters), PMI (null = template alone, behind the same demonstrations) and contextual
    calibration, with multi-token words and two words per label, zero-shot and behind a 2-shot prefix."""
    prefix = demonstration_prefix(["Loved it.", "A bore."], ["great", "terrible"], TASK.prompt) if k else ""
    words, word_labels = zeroshot.label_word_list(TASK)
    hand = _hand_word_scores(lm, [prefix + t for t in TEXTS], TASK.prompt, words)
    hand_null = _hand_word_scores(lm, [prefix], TASK.prompt, words)[0]
    hand_cf = _hand_word_scores(lm, [prefix + t for t in zeroshot.CONTENT_FREE_TEXTS], TASK.prompt, words)
    lengths = np.array([8.0, 12.0, 5.0, 10.0])  # terrible, not worth it, great, a must see: characters
    cf = _labels_of(hand_cf, word_labels)
    cf_probs = np.exp(cf) / np.exp(cf).sum(1, keepdims=True)
    expected = {"ll": _labels_of(hand, word_labels), "acc_norm": _labels_of(hand / lengths, word_labels),
                "pmi": _labels_of(hand - hand_null, word_labels)}
    expected["calibrated"] = expected["ll"] - np.log(cf_probs.mean(0))

    result = zeroshot.zero_shot(lm, TASK, TEXTS, rule="pmi", prefix=prefix, batch_size=8, progress=False)
    np.testing.assert_allclose(result.word_scores, hand, rtol=1e-5, atol=2e-4)
    assert set(result.rule_scores) == set(zeroshot.SCORING_RULES)
    for rule, scores in expected.items():
        np.testing.assert_allclose(result.rule_scores[rule], scores, rtol=1e-5, atol=2e-4, err_msg=rule)
    np.testing.assert_array_equal(result.predictions, expected["pmi"].argmax(1))


def test_acc_norm_divides_by_characters_as_lm_eval():
    """lm-eval's ``completion_len = len(choice)``: characters of the choice, without the delimiter (a
    non-ASCII word counts characters, not UTF-8 bytes)."""
    np.testing.assert_array_equal(zeroshot.completion_lengths(["great", "a must see", "très bon", " bad"]),
                                  [5, 10, 8, 3])


def test_every_rule_is_batch_size_invariant(lm):
    texts = TEXTS * 2
    reference = zeroshot.zero_shot(lm, TASK, texts, batch_size=8, progress=False)
    for batch_size, mesh in [(3, parallel.data_mesh(jax.devices()[:1]))]:
        result = zeroshot.zero_shot(lm, TASK, texts, batch_size=batch_size, mesh=mesh, progress=False)
        for rule in zeroshot.SCORING_RULES:
            np.testing.assert_allclose(result.rule_scores[rule], reference.rule_scores[rule], rtol=1e-6, atol=1e-5)


def test_ece_and_brier_on_a_hand_example():
    probabilities = np.array([[0.95, 0.05], [0.62, 0.38], [0.32, 0.68], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])  # right, wrong, right, right
    # bins (0.9,1]: |1 − .95|; (0.6,0.7]: |½ − .65| for 2 examples; (0.5,0.6]: |1 − .55|
    assert statistics.expected_calibration_error(probabilities, labels) == pytest.approx((0.05 + 2 * 0.15 + 0.45) / 4)
    assert statistics.expected_calibration_error(probabilities, labels, n_bins=1) == pytest.approx(abs(0.75 - 0.7))
    assert statistics.brier_score(probabilities, labels) == pytest.approx((0.005 + 0.7688 + 0.2048 + 0.405) / 4)
    boundary = np.array([[0.7, 0.3], [0.65, 0.35]])  # 0.7 belongs to (0.6, 0.7], with 0.65
    assert statistics.expected_calibration_error(boundary, np.array([0, 1])) == pytest.approx(abs(0.5 - 0.675))
    np.testing.assert_allclose(statistics.softmax(np.log(probabilities) + 3.0), probabilities)
    evaluation = zeroshot.evaluate_scores(np.log(probabilities), labels)
    assert evaluation == pytest.approx({"accuracy": 0.75, "ece": 0.2, "brier": 0.3459, "n": 4})
    with pytest.raises(SentcompError, match="Labels must be in"):
        statistics.brier_score(probabilities, np.array([0, 1, 2, 0]))


def test_demonstrations_are_seeded_balanced_and_never_the_test_item():
    texts = [f"review {i}" for i in range(30)]
    labels = np.array([0] * 20 + [1] * 10)
    test_texts = ["review 0", "review 25", "unseen"]
    for seed in range(5):
        chosen = sample_demonstrations(texts, labels, 5, seed, balanced=True, exclude=test_texts)
        np.testing.assert_array_equal(chosen, sample_demonstrations(texts, labels, 5, seed, exclude=test_texts))
        assert sorted(np.bincount(labels[chosen], minlength=2)) == [2, 3] and len(set(chosen)) == 5
        assert not {0, 25} & set(chosen.tolist())
        unbalanced = sample_demonstrations(texts, labels, 28, seed, balanced=False, exclude=test_texts)
        assert sorted(unbalanced) == [i for i in range(30) if i not in (0, 25)]
    draws = {tuple(sample_demonstrations(texts, labels, 4, seed)) for seed in range(5)}
    assert len(draws) > 1  # the seed matters
    assert len(sample_demonstrations(texts, labels, 0, 0)) == 0
    with pytest.raises(SentcompError, match="needs 6 demonstrations of label 0, but train has only 5"):
        sample_demonstrations(texts[15:], labels[15:], 12, 0)
    with pytest.raises(SentcompError, match="lower k"):
        sample_demonstrations(texts, labels, 29, 0, balanced=False, exclude=test_texts)


def test_prefix_format_and_truncation_drops_demonstrations_first(lm):
    prefix = demonstration_prefix(["Loved it.", "A bore."], [" great", "terrible"], " This movie is ", "\n\n")
    assert prefix == "Loved it. This movie is great\n\nA bore. This movie is terrible\n\n"
    assert demonstration_prefix(["Fine"], ["good"], " It was", " | ") == "Fine It was good | "
    text, prompt, tokenizer = TEXTS[3], " This movie is", lm.tokenizer
    whole = tokenizer.encode(prefix + text + prompt)
    for max_length in (len(whole) - 3, len(tokenizer.encode(text + prompt)), 6):
        kept = encode_texts(tokenizer, [prefix + text], max_length, prompt).token_ids[0]
        assert list(kept) == whole[-max_length:]  # the left end goes first: demonstrations, then the text's start
    rows = zeroshot.build_rows(tokenizer, [prefix + text], TASK.prompt, ["great"], 8)
    assert list(rows[0].input_ids[-3:]) == tokenizer.encode(prompt)  # the prompt always survives


# ---------------------------------------------------------------------------------------- Table 1 program


@pytest.fixture(scope="module")
def smoke_run(smoke_workdir):
    return load_config(f"{EXPERIMENTS_DIR / 'table1'}.py:smoke"), smoke_workdir("table1")


def test_table1_smoke_reports_rules_shots_and_sensitivity(smoke_run):
    config, workdir = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    markdown = (workdir / "results.md").read_text()
    summary = results["zeroshot"]
    assert {(e["k"], e["rule"]) for e in summary["rules"]} == {
        (k, rule) for k in (0, *config.zeroshot.shots) for rule in zeroshot.SCORING_RULES}
    n_templates, n_verbalizers = len(results["tasks"][0]["templates"]), len(results["tasks"][0]["verbalizers"])
    assert (n_templates, n_verbalizers) == (4, 3)
    for entry in summary["sensitivity"]:
        values = list(entry["accuracies"].values())
        assert len(values) == 12 and entry["min"] == min(values) <= entry["mean"] <= entry["max"] == max(values)
    assert "## Zero- and few-shot scoring rules" in markdown and "## Prompt sensitivity" in markdown
    cells = [json.loads(line) for line in (workdir / layout.CELLS_FILE).read_text().splitlines()]
    variants = {(c["k"], c["t"], c["v"]): c for c in cells if c.get("kind") == "zeroshot_variant"}
    column = next(c for c in cells if c.get("column") == "zeroshot")
    assert column["test_accuracy"] == variants[0, 0, 0]["rules"]["ll"]["accuracy"]
    k_shot = variants[max(config.zeroshot.shots), 0, 0]
    data = task_data.prepare_task("rotten_tomatoes", config)
    (train, test), = data.pairs
    assert len(k_shot["demonstrations"]) == max(config.zeroshot.shots) > 0
    assert not {train.texts[i] for i in k_shot["demonstrations"]} & set(test.texts)
    ll = next(e for e in summary["rules"] if (e["k"], e["rule"]) == (0, "ll"))
    low, high = statistics.wilson_interval(ll["mean"] * len(test), len(test))
    assert f"| rotten_tomatoes* | 0 | log-likelihood | {100 * ll['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]" \
        in markdown


def test_other_templates_or_rule_rescore_only_zero_shot(smoke_run, tmp_path, monkeypatch):
    """A new template list scores only the new variants (probes untouched); a new headline rule re-derives the
    zero-shot column from the stored variant cells, without the model."""
    config, original = smoke_run
    workdir = tmp_path / "copy"
    shutil.copytree(original, workdir)
    monkeypatch.setattr(probe, "evaluate", lambda *a, **k: pytest.fail("a probe was refitted"))
    scored = []
    real = zeroshot.word_scores
    monkeypatch.setattr(zeroshot, "word_scores", lambda lm, texts, prompt, *a, **k: scored.append(prompt)
                        or real(lm, texts, prompt, *a, **k))
    table1.run(override(config, {"zeroshot.templates": (" This movie is ", " Honestly, it was "),
                                 "zeroshot.shots": (0,)}), workdir)
    assert scored == [" Honestly, it was "]
    monkeypatch.setattr(zeroshot, "word_scores", lambda *a, **k: pytest.fail("scored again"))
    headline = table1.run(override(config, {"zeroshot.rule": "calibrated"}), workdir)
    cells = cells_log.read_cells(workdir / layout.CELLS_FILE)
    variant = next(c for c in cells.values() if c.get("kind") == "zeroshot_variant" and (c["k"], c["t"], c["v"]) ==
                   (0, 0, 0))
    assert headline["rotten_tomatoes*/zeroshot"] == variant["rules"]["calibrated"]["accuracy"]


def test_zeroshot_config_errors_name_the_key():
    config = load_config(f"{EXPERIMENTS_DIR / 'table1'}.py:smoke")
    for changes, message in [
        ({"zeroshot.rule": "max"}, "Unknown zero-shot scoring rule 'max'"),
        ({"zeroshot.shots": (0, -1)}, "config.zeroshot.shots must be"),
        ({"truncation": "end"}, "need config.truncation='start'"),
        ({"zeroshot.verbalizers": ("bad;good;meh",)}, "config.zeroshot.verbalizers entry 'bad;good;meh'"),
        ({"zeroshot.templates": (" ",)}, "config.zeroshot.templates must be non-blank"),
        ({"zeroshot.ece_bins": 0}, "config.zeroshot.ece_bins"),
    ]:
        with pytest.raises(SentcompError, match=message):
            zeroshot_column.check_zeroshot_config(override(config, changes))
    custom = override(config, {"zeroshot.verbalizers": ("awful,dire;superb",)})
    zeroshot_column.check_zeroshot_config(custom)
    plan = zeroshot_column.zeroshot_plan(get_task("rotten_tomatoes"), custom.zeroshot)
    templates, verbalizers = plan.templates, plan.verbalizers
    assert verbalizers == ({"negative": ("awful", "dire"), "positive": ("superb",)},)
    assert templates[0] == get_task("rotten_tomatoes").prompt


def test_paper_sweep_builds_and_validates_and_its_smoke_composition_too(tmp_path):
    """``table1.py:paper`` (GPT-2, the paper's tasks and columns, BERT, FT, full splits) builds and validates
    offline (its data and GPT-2 are downloads); ``paper,smoke`` is the same composition on offline assets and passes
    every check a run makes before it starts. (Its pieces run in other tests: the columns in test_table1, BERT and
    fine-tuning in test_multihost's ``smoke,bert,ft`` run; running it all again here would cost minutes.)"""
    table1_file = EXPERIMENTS_DIR / "table1.py"
    paper = load_config(f"{table1_file}:paper")
    points = load_sweep(f"{table1_file}:paper")
    assert [point["tasks"] for point in points] == [("sst2",), ("sst5",), ("imdb",), ("agnews",), ("mpqa",), ("cr",)]
    for point in points:
        config = override(paper, point)
        assert (config.model, config.n_train, config.n_test, config.bert.enabled, config.ft.enabled) == (
            "gpt2", 0, 0, True, True)
        runner.validate(config, tmp_path / "paper" / point["tasks"][0], program_checks=False)
        zeroshot_column.check_zeroshot_config(config)
    (point,) = load_sweep(f"{table1_file}:paper,smoke")
    smoke = override(load_config(f"{table1_file}:paper,smoke"), point)
    assert smoke.columns == paper.columns and smoke.bert.enabled and smoke.ft.enabled
    runner.validate(smoke, tmp_path / "smoke")
    assert table1.table_columns(smoke) == [*paper.columns, "bert", "finetune", "zeroshot"]


def test_prompt_row_probes_under_templates_and_a_k_shot_prefix(smoke_run, tmp_path):
    """``config.prompt_probes`` (off by default): the prompt row's probes under every other template and after a
    2-shot prefix whose demonstrations leave the probe's training set; mean/min/max over templates reported."""
    config, original = smoke_run
    workdir = tmp_path / "copy"
    shutil.copytree(original, workdir)
    config = override(config, {"columns": ("f",), "prompt_probes.templates": True, "prompt_probes.shots": 2})
    table1.run(config, workdir)
    results = json.loads((workdir / "results.json").read_text())
    (entry,) = results["probe_variants"]
    templates = [entry["accuracies"][row] for row in ("rotten_tomatoes*", "rotten_tomatoes*t1", "rotten_tomatoes*t2",
                                                       "rotten_tomatoes*t3")]
    assert entry["mean"] == pytest.approx(np.mean(templates)) and entry["max"] == max(templates)
    assert entry["accuracies"]["rotten_tomatoes*"] == results["table"]["rotten_tomatoes*"]["f"]["mean"]
    cells = [c for c in results.get("cells", []) if c.get("kind") == "probe_variant"] or [
        json.loads(line) for line in (workdir / layout.CELLS_FILE).read_text().splitlines()]
    k_shot = next(c for c in cells if c.get("row") == "rotten_tomatoes*k2")
    assert k_shot["n_train"] == results["tasks"][0]["n_train"] - 2 and len(k_shot["demonstrations"]) == 2
    assert "## Prompt-row probes: templates and k-shot prefix" in (workdir / "results.md").read_text()


def test_task_templates_and_verbalizers_put_the_tasks_own_first():
    task = task_from_config({
        "name": "fewshot_templates", "label_names": ["neg", "pos"], "prompt": " It was ",
        "label_words": {"neg": "bad", "pos": ["good"]}, "templates": [" Honestly, ", " It was "],
        "verbalizers": [{"neg": ["awful", "dire"], "pos": "superb"}, {"neg": ["bad"], "pos": ["good"]}]})
    assert task.prompt_templates == (" It was ", " Honestly, ")
    assert task.label_verbalizers == ({"neg": ("bad",), "pos": ("good",)},
                                      {"neg": ("awful", "dire"), "pos": ("superb",)})
    rotten = get_task("rotten_tomatoes")
    assert (len(rotten.prompt_templates), len(rotten.label_verbalizers)) == (4, 3)
    assert rotten.prompt_templates[0] == rotten.prompt and rotten.label_verbalizers[0] == dict(rotten.label_words)
    with pytest.raises(SentcompError, match=r"verbalizer .* \(need non-blank word"):
        task_from_config({"name": "bad_verbalizer", "label_names": ["neg", "pos"], "prompt": " It was ",
                          "label_words": {"neg": "bad", "pos": "good"}, "verbalizers": [{"neg": ["awful"]}]})
