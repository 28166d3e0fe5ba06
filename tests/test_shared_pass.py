"""One pass over the texts for several rows (sentcomp.features.extract_rows): each text read once, every prompt's
row continued from the text's key/value cache, equal to reading every row whole (extract_features per row)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sentcomp import models
from sentcomp.data import text
from sentcomp.features import ExtractionOptions, RowRequest, continuation, extract_features, extract_rows
from sentcomp.models import tokenizers

TEXTS = ["a gripping, funny film.", "dull and far too long", "I loved every minute of it!",
         "the plot makes no sense at all, and the acting is wooden", "great", "not my cup of tea ",
         "a " * 40 + "long review that the length limit cuts"]  # truncated: read whole, not continued
WORDS = ("great", "terrible", "good", "bad")


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama with the real GPT-2 tokenizer (a byte-pair tokenizer, offline)."""
    tokenizer = tokenizers.gpt2_tokenizer()
    config = {"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
              "tie_word_embeddings": True}
    return models.init("llama", config, 0, tokenizer=tokenizer)


REQUESTS = [RowRequest(("f", "phi_p_f", "word_logits"), None, WORDS),
            RowRequest(("f", "phi_p_f", "log_z", "word_log_probs", "projected_p_f"), " This movie is ", WORDS),
            RowRequest(("word_log_probs",), " It was ", ("great", "terrible")),
            RowRequest(("word_probs", "f"), " All in all, the film was ", WORDS, tuple(TEXTS[1:5]))]


def separately(lm, requests, **options):
    return [extract_features(lm, list(r.texts) if r.texts else TEXTS, r.kinds, words=list(r.words), prompt=r.prompt,
                             progress=False, **options) for r in requests]


@pytest.fixture(scope="module")
def read_whole(llama):
    """Every row of REQUESTS read whole, row by row (the reference of the one pass)."""
    return separately(llama, REQUESTS, max_length=24, batch_size=4)


@pytest.mark.parametrize("fit", [False, True])
def test_one_pass_equals_every_row_read_whole(llama, read_whole, monkeypatch, fit):
    """Also with the batches' padded lengths fitted to the pass's lengths (text.fitted_buckets, which only passes
    of MIN_BATCHES_TO_FIT batches or more use)."""
    if fit:
        monkeypatch.setattr(text, "MIN_BATCHES_TO_FIT", 1)
    options = ExtractionOptions(max_length=24, batch_size=4, progress=False)
    shared = extract_rows(llama, TEXTS, REQUESTS, options)
    for request, got, expected in zip(REQUESTS, shared, read_whole):
        for kind in request.kinds:
            np.testing.assert_allclose(got[kind], expected[kind], rtol=1e-5, atol=1e-5, err_msg=kind)
    # the prompt rows continued every text but the truncated one; the no-prompt row read every text once
    assert [r["metadata"]["continued_rows"] for r in shared] == [len(TEXTS), len(TEXTS) - 1, len(TEXTS) - 1, 4]


def test_the_pass_fills_the_cache_that_extract_features_reads(llama, tmp_path):
    options = ExtractionOptions(max_length=24, batch_size=4, progress=False, cache_dir=tmp_path)
    first = extract_rows(llama, TEXTS, REQUESTS, options)
    assert all(r["metadata"]["computed_chunks"] == [0] for r in first)
    again = separately(llama, REQUESTS, max_length=24, batch_size=4, cache_dir=tmp_path)
    for request, stored, read in zip(REQUESTS, first, again):
        assert read["metadata"]["computed_chunks"] == []  # every row was cached by the one pass
        for kind in request.kinds:
            np.testing.assert_array_equal(stored[kind], read[kind])


def test_a_model_without_a_key_value_cache_reads_every_row_whole(tmp_path):
    lm = models.init("gpt2", {"vocab_size": 257, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64}, 0,
                     tokenizer=tokenizers.byte_tokenizer())
    assert lm.prefill_fn is None
    requests = [RowRequest(("f",)), RowRequest(("f", "log_z"), " This movie is ")]
    shared = extract_rows(lm, TEXTS[:3], requests, max_length=64, progress=False)
    for request, got in zip(requests, shared):
        expected = extract_features(lm, TEXTS[:3], request.kinds, prompt=request.prompt, max_length=64,
                                    progress=False)
        assert got["metadata"]["continued_rows"] == 0
        for kind in request.kinds:
            np.testing.assert_array_equal(got[kind], expected[kind])


def test_a_row_continues_only_when_it_starts_with_the_texts_tokens():
    text = np.array([5, 6, 7])
    np.testing.assert_array_equal(continuation(text, np.array([5, 6, 7, 8, 9])), [8, 9])
    assert continuation(text, np.array([5, 6, 7])).size == 0
    assert continuation(text, np.array([6, 7, 8, 9])) is None  # truncated at the start
    assert continuation(text, np.array([5, 6, 70, 9])) is None  # merged across the boundary


@pytest.mark.slow  # two smoke-sized Table-1 runs
def test_table1_reads_each_text_once_and_gets_the_table_of_separate_passes(llama, tmp_path, monkeypatch):
    """A Table-1 run on a cached-decoder model: the prompt row and every zero-shot template at k = 0 continue the
    texts' cached states (one pass), and every cell equals the run that reads each row whole."""
    from sentcomp import models as models_lib
    from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config
    from sentcomp.programs import table1

    model_dir = tmp_path / "llama"
    models_lib.save_hf(llama, model_dir)
    llama.tokenizer.save_pretrained(str(model_dir))
    config = load_config(f"{EXPERIMENTS_DIR}/table1.py:smoke")
    config.model = str(model_dir)
    config.columns = ("f", "phi_p_f", "subset_logits")
    config.n_train, config.n_test = 24, 12
    config.zeroshot.shots = (0,)  # k = 0 is what one pass reads (every template: the sensitivity table)
    table1.run(config, tmp_path / "one_pass")
    monkeypatch.setattr(table1, "read_texts_once", lambda *args: None)
    table1.run(config, tmp_path / "row_by_row")

    def cells(run):
        rows = [json.loads(line) for line in (tmp_path / run / "cells.jsonl").read_text().splitlines()]
        return {row["key"]: row for row in rows if "key" in row}

    one_pass, row_by_row = cells("one_pass"), cells("row_by_row")
    assert one_pass.keys() == row_by_row.keys()
    zero_shot = [key for key, cell in one_pass.items() if cell.get("kind") == "zeroshot_variant"]
    assert len({one_pass[key]["template"] for key in zero_shot}) == 4
    for key, cell in one_pass.items():
        if "test_accuracy" in cell:
            assert cell["test_accuracy"] == row_by_row[key]["test_accuracy"], key
        for rule, scores in cell.get("rules", {}).items():
            for measure in ("accuracy", "ece", "brier"):
                assert scores[measure] == pytest.approx(row_by_row[key]["rules"][rule][measure], abs=1e-5), key
    # the one-pass run continued every template's row from the texts' states: its feature cache holds the
    # templates' extractions, and its timings show the one pass instead of per-template scoring passes
    manifests = (tmp_path / "one_pass" / "features").glob("*/manifest.json")
    prompts = {(json.loads(m.read_text())["prompt"] or "").strip() for m in manifests}
    assert {"", "This movie is", "It was", "All in all, the film was", "In summary, this movie is"} <= prompts
    timings = json.loads((tmp_path / "one_pass" / "results.json").read_text())["timings"]
    parts = [part["part"] for part in timings["parts"]]
    assert "features rotten_tomatoes (5 rows, one pass)" in parts
