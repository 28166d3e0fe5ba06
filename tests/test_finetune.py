"""Fine-tuning (the paper's FT column): learns a separable task built here, and resumes exactly after an
interruption."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from sentcomp.data.loaders import Split
from sentcomp.errors import SentcompError
from sentcomp.models import gpt2
from sentcomp.models.tokenizers import byte_tokenizer
from sentcomp.training import finetune

WORDS = (["fig", "kiwi", "lime", "plum"], ["bed", "desk", "door", "sofa"])


def separable_split(n: int, seed: int) -> Split:
    """Texts of 2-5 words, all from the word list of their class (fruit vs furniture)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    texts = [" ".join(rng.choice(WORDS[label], rng.integers(2, 6))) for label in labels]
    return Split(texts, labels)


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random GPT-2 over bytes (V = 257), so the auxiliary LM loss is cheap too."""
    return gpt2.init(gpt2.gpt2_config(vocab_size=257, n_embd=32, n_layer=2, n_head=2, n_positions=32), rng=0,
                     tokenizer=byte_tokenizer())


CONFIG = dict(prompt=" is ", batch_size=16, eval_batch_size=32, eval_every=10, patience=100,
              val_fraction=0.25, max_length=32, buckets=(32,), progress=False,
              optimizer=finetune.OptimizerOptions(learning_rate=3e-3, warmup_steps=5, weight_decay=0.0))


def options(**values) -> finetune.FinetuneOptions:
    return finetune.FinetuneOptions(**{**CONFIG, **values})


@pytest.mark.slow
def test_learns_a_separable_task(tiny_lm, tmp_path):
    results = finetune.finetune_accuracy(tiny_lm, separable_split(128, 0), separable_split(64, 1),
                                         options(max_steps=40), tmp_path)
    assert results["val_accuracy"] >= 0.9 and results["test_accuracy"] >= 0.9  # chance is about 0.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [10, 20, 30, 40]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] > 0 for row in rows)
    assert results["best_step"] in (10, 20, 30, 40) and results["n_val"] == 32
    assert plt.imread(tmp_path / "curves.png").ndim == 3  # the run's loss and validation curves, readable
    # Finished: the same call returns the recorded results; another config in the same workdir is refused.
    assert finetune.finetune_accuracy(tiny_lm, separable_split(128, 0), separable_split(64, 1),
                                      options(max_steps=40), tmp_path) == results
    with pytest.raises(SentcompError, match="different config"):
        finetune.finetune_accuracy(tiny_lm, separable_split(128, 0), separable_split(64, 1),
                                   options(max_steps=41), tmp_path)


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(tiny_lm, tmp_path):
    train, test = separable_split(64, 2), separable_split(32, 3)
    config = options(max_steps=20, aux_lm_weight=0.5)
    whole = finetune.finetune_accuracy(tiny_lm, train, test, config, tmp_path / "whole")

    class Interrupted(Exception):
        pass

    def interrupt_at_step_13(step):
        if step == 13:
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune.finetune_accuracy(tiny_lm, train, test, config, tmp_path / "resumed", on_step=interrupt_at_step_13)
    assert not (tmp_path / "resumed" / "results.json").exists()
    resumed = finetune.finetune_accuracy(tiny_lm, train, test, config, tmp_path / "resumed")
    assert resumed == whole
    timing = ("tokens_per_s", "mfu", "train_seconds")  # wall-clock measurements, the only columns that differ
    read = lambda run: [{key: value for key, value in json.loads(line).items() if key not in timing}  # noqa: E731
                        for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert read("resumed") == read("whole")


def test_bad_config_is_clear(tiny_lm, tmp_path):
    with pytest.raises(SentcompError, match=r"Unknown fine-tuning config keys \['lr'\]; known keys: .*'optimizer'"):
        finetune.FinetuneOptions.from_mapping(dict(lr=1e-3))
    with pytest.raises(SentcompError, match=r"Unknown fine-tuning optimizer keys \['lr'\]; known keys: .*'b1'"):
        finetune.FinetuneOptions.from_mapping(dict(optimizer=dict(lr=1e-3)))


def test_table1_ft_and_bert_columns_config():
    """experiments/table1.py's ``bert``/``ft`` args turn the columns on; config.ft maps onto finetune's config."""
    from sentcomp.evaluators.bert import BERT
    from sentcomp.evaluators.finetune import FINETUNE, finetune_config
    from sentcomp.evaluators.zeroshot import ZEROSHOT
    from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config
    from sentcomp.programs import table1

    plain = load_config(f"{EXPERIMENTS_DIR / 'table1.py'}:smoke")
    assert not plain.bert.enabled and not plain.ft.enabled
    config = load_config(f"{EXPERIMENTS_DIR / 'table1.py'}:smoke,bert,ft")
    assert table1.table_columns(config)[-3:] == [BERT, FINETUNE, ZEROSHOT]
    merged = finetune_config(config, n_train=50, prompt=" This movie is ")  # from_mapping refuses unknown keys
    assert isinstance(merged, finetune.FinetuneOptions)
    assert merged.max_steps == -(-4 * 50 // config.ft.batch_size) and merged.prompt == " This movie is "
    assert merged.optimizer.learning_rate == config.ft.optimizer.learning_rate
