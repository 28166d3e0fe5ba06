"""Pretraining GPT-2 (or a Llama-family LM) with cross-entropy or the paper's Quad loss, then probing downstream
(sentcomp.programs.pretrain).

The paper's setting (Section 6 of arXiv 2010.03648): GPT-2 small with the extra d×d linear layer and untied Φ,
trained from scratch on WikiText-103 with each loss. Those are the default (non-smoke) arguments; WikiText-103
must be on disk in the Hub's layout (``huggingface-cli download Salesforce/wikitext --repo-type=dataset
--include='wikitext-103-raw-v1/*' --local-dir=/data/wikitext``)::

    python -m sentcomp.main --config=experiments/pretrain.py:loss=xent --workdir=runs/pretrain_xent \
        --config.data.corpus.path=/data/wikitext
    python -m sentcomp.main --config=experiments/pretrain.py:loss=quad --workdir=runs/pretrain_quad \
        --config.data.corpus.path=/data/wikitext
    # both losses × 3 learning rates, one sweep (each point resumable)
    python -m sentcomp.main --config=experiments/pretrain.py --workdir=runs/pretrain_sweep --sweep \
        --config.data.corpus.path=/data/wikitext
    # on a Cloud TPU slice: the same command on every host with --distributed (tpu_configs/README.md)
    # a GPT-2-small-shaped Llama with the Quad head; or continue pretraining the offline SmolLM2-135M
    python -m sentcomp.main --config=experiments/pretrain.py:family=llama,loss=quad --workdir=runs/llama_quad \
        --config.data.corpus.path=/data/wikitext
    python -m sentcomp.main --config=experiments/pretrain.py:family=llama,loss=quad --workdir=runs/smollm2_quad \
        --config.init.source=smollm2-135m --config.data.corpus.path=/data/wikitext

The optimiser settings (AdamW 6e-4, 2,000 warmup steps, cosine decay, 512-token blocks, 64 blocks per step,
50,000 steps) are our choices: the paper does not state its pretraining hyperparameters.

Arguments (``:key=value,...``): ``loss=xent|quad``, ``size=tiny|small|medium|large|xl``,
``corpus=wikitext|lee|enwiki``, ``family=gpt2|llama|qwen2|mistral|gemma|gpt_neox``, ``smoke``. ``smoke``: a
2-layer d=64 GPT-2 (or ``family``) with the byte-level tokenizer (V = 257) on the 300 offline news articles of
gensim's lee_background.cor, 40 steps of 16 × 64 tokens (67 s wall on the shared 2-core CPU machine at load
average 4–18, 8 simulated devices, 2026-12-05); the loss visibly drops for
both losses. Re-running with the same workdir resumes from the last checkpoint.

``family`` other than gpt2 (a rotary decoder, sentcomp.models.decoder) adds to ``config.model``
``intermediate_size`` (0: 8·d/3 rounded up to a multiple of 64, GPT-NeoX 4·d), ``num_key_value_heads`` (0:
``n_head``; fewer for grouped-query attention) and ``rope_theta`` (10000); ``n_embd``, ``n_layer``, ``n_head``,
``n_positions`` are its hidden size, layers, query heads and context (sentcomp.models.hf_model_config).
``config.init.source`` (any causal LM sentcomp.models.load reads) replaces family, shape and tokenizer by the
checkpoint's; ``config.init.phi_from`` / ``config.init.embeddings_from`` take only Φ / the input embeddings from
such a model (same V and d) and train the rest from scratch.

Produces metrics.jsonl (train loss, validation cross-entropy and Quad loss, tokens/s, and the downstream probe's
accuracies of f(s) and Φp_f(s) on Rotten Tomatoes every ``probe.every`` steps), results.json, checkpoints/
(Orbax) and model/ (final weights, the family's HF layout, loadable with sentcomp.models.load).
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from sentcomp.data.corpora import CorpusSpec
from sentcomp.errors import SentcompError
from sentcomp.launcher import sweep
from sentcomp.launcher.config_files import parse_config_arg

SIZES = {  # (n_layer, n_embd, n_head)
    "tiny": (2, 64, 2),
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 25),
}


def corpus_config(kind: str) -> ml_collections.ConfigDict:
    """Every CorpusSpec field (so each can be overridden); WikiText's folder is required (a placeholder)."""
    fields = {field.name: field.default for field in dataclasses.fields(CorpusSpec)}
    corpus = ml_collections.ConfigDict({**fields, "kind": kind})
    if kind == "wikitext":
        corpus.path = config_dict.placeholder(str)
    return corpus


def _args(arg):
    return parse_config_arg(arg, loss="xent", size="small", corpus="wikitext", family="gpt2", smoke=False)


def get_config(arg=None):
    args = _args(arg)
    if args.size not in SIZES:
        raise SentcompError(f"Unknown size {args.size!r}; choose one of {sorted(SIZES)}.")
    config = ml_collections.ConfigDict()
    config.program = "sentcomp.programs.pretrain"
    config.loss = args.loss
    config.seed = 0  # model initialisation
    n_layer, n_embd, n_head = SIZES[args.size]
    config.model = ml_collections.ConfigDict(dict(
        family=args.family, vocab_size=0, n_positions=1024, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        quad_head=True,  # the paper's Quad architecture (extra d×d linear layer, untied Φ), for both losses
        tie_word_embeddings=False,
        # how the layer stack runs (same parameters and results; docs/pretraining.md "Layer stack and attention"):
        # scanned (one compiled layer body) or unrolled, remat none | full | dots, attention xla | cudnn | chunked
        scan_layers=True, remat="none", attention="xla", attention_chunk=512,
    ))
    if args.family != "gpt2":  # a rotary decoder; 0 = derived (sentcomp.models.hf_model_config)
        config.model.update(intermediate_size=0, num_key_value_heads=0, rope_theta=10000.0)
    config.tokenizer = "gpt2"  # or "bytes" (V = 257); vocab_size 0 = the tokenizer's size
    # source: e.g. "gpt2" (the whole model); "" = scratch. phi_from / embeddings_from: start only Φ / the input
    # embeddings from that model (any models.load source; shapes must match), the rest from scratch (the authors'
    # option); with freeze_phi, Φ then stays the pretrained one.
    config.init = ml_collections.ConfigDict(dict(source="", freeze_phi=False, phi_from="", embeddings_from=""))

    config.data = ml_collections.ConfigDict()
    config.data.corpus = corpus_config(args.corpus)
    config.data.seq_len = 512
    config.data.seed = 0  # the data order

    config.num_steps = 50_000
    config.batch_size = 64  # blocks per optimiser step (global, whatever the device count)
    config.grad_accum = 1
    # devices per mesh axis (-1: the rest): batches split over all; "fsdp" > 1 shards parameters and optimiser
    # state over that many devices (sentcomp.parallel.leaf_sharding), e.g. {"data": -1, "fsdp": 8} for GPT-2 xl
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    config.compute_dtype = "float32"  # "bfloat16": model and loss in bf16, float32 master weights and optimiser
    # The loss's matmul precision: "auto" = "high" on GPU (TF32) and TPU (3 bf16 passes), "highest" on CPU; or any
    # jnp precision ("highest", "high", "default"). log Z and softmax statistics stay float32 (docs/precision.md).
    config.matmul_precision = "auto"
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=6e-4, warmup_steps=2000, decay="cosine", end_lr_fraction=0.1,
        weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
    ))
    config.eval_every = 500
    config.eval_blocks = 512  # first validation blocks used (≤ 0: all)
    config.eval_batch_size = 32
    config.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, asynchronous=True))
    config.probe = ml_collections.ConfigDict(dict(
        every=5000, task="rotten_tomatoes", num_train=2000, num_test=1000, features=("f", "phi_p_f"),
        max_length=128, batch_size=64, seed=0,
        protocol="mteb", standardize=True,  # C = 1 logistic regression (cheap); "paper" = the 5-fold CV recipe
        samples_per_label=0,  # mteb: 0 = one probe on all of train; MTEB's own protocol: 8 per label, 10 times
    ))
    config.progress = True

    if args.smoke:
        if args.corpus == "wikitext":
            config.data.corpus = corpus_config("lee")
        config.tokenizer = "bytes"
        config.model.update(n_positions=64, n_layer=2, n_embd=64, n_head=2)
        config.data.seq_len = 64
        config.num_steps = 40
        config.batch_size = 16
        config.optimizer.update(learning_rate=3e-3, warmup_steps=5)
        config.eval_every = 10
        config.eval_blocks = 32
        config.eval_batch_size = 16
        config.checkpoint.update(every=20, keep=2)
        config.probe.update(every=40, num_train=200, num_test=100, max_length=64, batch_size=32)
    return config


def get_sweep(arg=None):
    """Both losses × three peak learning rates."""
    rates = [1e-3, 3e-3, 1e-2] if _args(arg).smoke else [3e-4, 6e-4, 1.2e-3]
    return sweep.product(sweep.axis("loss", ["xent", "quad"]), sweep.axis("optimizer.learning_rate", rates))
