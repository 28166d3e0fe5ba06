"""Shared by test_lmeval*.py and benchmarks/lmeval.py: a tiny random sentcomp Llama exported with ``save_hf`` (with
a real byte-level BPE tokenizer that prepends a BOS), and local lm-eval task YAMLs over JSON-lines files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ("gorgeous witty seductive movie acting terrible plot makes sense charming slight film friends moving "
         "funny picture never forgets heart bother script written minutes shows boring dull great awful").split()


def bos_byte_bpe(texts, vocab_size: int = 300):
    """A real byte-level BPE tokenizer trained on ``texts`` whose encodings start with ``<s>`` (a Llama-style BOS),
    with ``</s>`` as EOS: what exercises lm-eval's BOS conventions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def documents(n: int, seed: int, min_words: int = 3, max_words: int = 30) -> list[dict]:
    """``n`` seeded documents ``{"text", "label"}`` of random words (some longer than the tiny model's context)."""
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS, rng.integers(min_words, max_words + 1))).capitalize() + ".",
             "label": int(rng.integers(2))} for _ in range(n)]


def export_tiny_llama(directory: Path, max_position_embeddings: int = 40, seed: int = 0) -> Path:
    """A random sentcomp Llama (grouped-query attention, odd sizes; weights scaled up so that scores differ
    clearly between choices) written with ``save_hf``: loadable by sentcomp and by transformers."""
    import jax

    from sentcomp.models import init, save_hf

    tokenizer = bos_byte_bpe([doc["text"] for doc in documents(200, seed=99)])
    hf_config = dict(vocab_size=len(tokenizer), hidden_size=36, intermediate_size=53, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=6, rope_theta=500.0,
                     max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                     bos_token_id=0, eos_token_id=1)
    lm = init("llama", hf_config, rng=seed, tokenizer=tokenizer)
    leaves, treedef = jax.tree.flatten(lm.params)
    rng = np.random.default_rng(seed)
    scaled = [np.asarray(leaf) * (1.0 + 0.5 * rng.standard_normal(np.shape(leaf))) if np.ndim(leaf) == 1
              else np.asarray(leaf) * (10.0 if np.shape(leaf)[0] == len(tokenizer) else 2.0) for leaf in leaves]
    return save_hf(lm.replace(params=jax.tree.unflatten(treedef, scaled)), directory)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_tasks(directory: Path, n_train: int = 12, n_test: int = 10) -> dict[str, str]:
    """Local task YAMLs over JSON-lines files written here (test documents alternately short, within the tiny
    model's context, and long, beyond it): name -> YAML path. Kinds: one-token choices
    (``sc_sentiment``), multi-token choices sharing prefixes (``sc_rating``), perplexity (``sc_perplexity``),
    greedy generation (``sc_generate``), and a multiple-choice task without a training split (``sc_no_train``)."""
    directory.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(directory / "train.jsonl", documents(n_train, seed=1))
    short, long = documents(n_test // 2, seed=2, min_words=2, max_words=6), documents(n_test - n_test // 2, seed=3,
                                                                                     min_words=30, max_words=60)
    test = write_jsonl(directory / "test.jsonl", [doc for pair in zip(short, long) for doc in pair])
    files = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {train}\n    test: {test}\n"
    splits = "training_split: train\ntest_split: test\n"
    tasks = {
        "sc_sentiment": files + splits + "output_type: multiple_choice\ndoc_to_text: \"{{text}} This movie is\"\n"
        "doc_to_choice: [\"terrible\", \"great\"]\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "sc_rating": files + splits + "output_type: multiple_choice\ndoc_to_text: \"Review: {{text}}\\nRating:\"\n"
        "doc_to_choice: [\"very bad film\", \"very good film\"]\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "sc_perplexity": files + splits + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
        "sc_generate": files + splits + "output_type: generate_until\ndoc_to_text: \"{{text}} In short:\"\n"
        "doc_to_target: \" great\"\ngeneration_kwargs:\n  until: [\".\", \"\\n\"]\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
        "sc_no_train": files + "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{text}} This movie is\"\ndoc_to_choice: [\"terrible\", \"great\"]\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n",
    }
    paths = {}
    for name, body in tasks.items():
        paths[name] = str(directory / f"{name}.yaml")
        Path(paths[name]).write_text(f"task: {name}\n" + body)
    return paths
