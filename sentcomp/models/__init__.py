"""Language models: ``load(source)`` gives a :class:`LanguageModel` for any family sentcomp implements.

A source is a Hub name (``"gpt2"``), a local Hugging Face directory (``config.json`` + weights), a training run's
workdir (the weights it saved in ``model/``), a ``.gguf`` file, or an alias of an offline asset (see ``ALIASES``).
The family is read from ``config.json``'s ``model_type`` and dispatched to the module that implements it; each
family module exposes ``from_hf(model_dir, config: dict, **options) -> LanguageModel`` and ``FACTS``, the
:class:`~sentcomp.models.base.FamilyFacts` the rest of sentcomp reads (:func:`facts`): its embedding parameters,
FLOPs shape, how to untie Φ, pretraining's shape keys. Adding a family = its module + a line in ``FAMILIES``; a
causal family that pretrains from scratch also has ``config_from_hf(dict)`` and ``init(config, rng, quad_head,
tokenizer)``, and ``save_hf(lm, directory)`` to export.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from sentcomp.errors import SentcompError
from sentcomp.models import hf
from sentcomp.models.base import FamilyFacts, LanguageModel

# model_type in config.json -> module implementing that family.
FAMILIES = {
    "gpt2": "sentcomp.models.gpt2",
    "llama": "sentcomp.models.llama",
    "qwen2": "sentcomp.models.qwen2",
    "mistral": "sentcomp.models.mistral",
    "gpt_neox": "sentcomp.models.gpt_neox",
    "gemma": "sentcomp.models.gemma",
    "bert": "sentcomp.models.bert",
}

# Short names of models that exist offline -> a loadable source (a path), or a function returning one (called
# by load(), so a missing offline package is reported only when its alias is used); families add theirs.
ALIASES: dict[str, str | Callable[[], str]] = {
    "smollm2-135m": lambda: importlib.import_module("sentcomp.models.gguf_loader").smollm2_135m_path(),
    "all-minilm-l6-v2": lambda: importlib.import_module("sentcomp.models.bert").all_minilm_l6_v2_path(),
}


def family_module(model_type: str):
    """The module implementing ``model_type``, or a clear error listing the supported ones."""
    if model_type not in FAMILIES:
        raise SentcompError(
            f"Unsupported model_type {model_type!r}; sentcomp implements {sorted(FAMILIES)}."
        )
    try:
        return importlib.import_module(FAMILIES[model_type])
    except ModuleNotFoundError as error:
        if error.name == FAMILIES[model_type]:
            raise NotImplementedError(f"The {model_type!r} model family is not implemented yet.") from None
        raise


def facts(model_type: str) -> FamilyFacts:
    """The :class:`~sentcomp.models.base.FamilyFacts` the family module of ``model_type`` declares (``FACTS``)."""
    return family_module(model_type).FACTS


def causal_families() -> tuple[str, ...]:
    """The registered families that are next-token LMs (not masked-LM encoders such as BERT)."""
    return tuple(name for name in FAMILIES if facts(name).causal)


RUN_MODEL_DIR = "model"  # where a training run (e.g. sentcomp.programs.pretrain) saves its final weights


def run_model_dir(directory: Path) -> Path:
    """``directory/model`` when ``directory`` is a training run's workdir (its own ``config.json``, if any, is the
    launcher's record, without ``model_type``, and ``model/config.json`` exists); else ``directory`` itself."""
    own, inner = directory / "config.json", directory / RUN_MODEL_DIR / "config.json"
    if inner.is_file() and not (own.is_file() and "model_type" in hf.read_config(directory)):
        return directory / RUN_MODEL_DIR
    return directory


def load(source: str, revision: str = "", **options) -> LanguageModel:
    """Loads a language model from a Hub name (at ``revision``, e.g. ``"step1000"``; ``""`` = the default branch),
    a local HF directory, a training run's workdir (its ``model/``, e.g. a pretraining run's, Quad head and untied Φ
    included), a GGUF file or an alias.

    ``options`` are passed to the family's loader (e.g. ``quad_head=True`` for GPT-2). A model loaded by alias
    is named by the alias (progress bars, result files), not by the file it resolves to.
    """
    if revision and (source in ALIASES or source.endswith(".gguf")):
        raise SentcompError(f"A revision ({revision!r}) applies to Hub names only, not to {source!r}.")
    if source in ALIASES:
        resolved = ALIASES[source]
        return load(resolved() if callable(resolved) else resolved, **options).replace(name=source)
    if source.endswith(".gguf"):
        return importlib.import_module("sentcomp.models.gguf_loader").from_gguf(source, **options)
    model_dir = run_model_dir(hf.resolve_hub_or_dir(source, revision))
    config = hf.read_config(model_dir)
    if "model_type" not in config and "program" in config:  # the launcher's record of a run
        raise SentcompError(f"{model_dir} is the workdir of a {config['program']} run but holds no {RUN_MODEL_DIR}/ "
                            f"with the trained model (the run has not finished, or {RUN_MODEL_DIR}/ was deleted): "
                            "re-run its command to finish or re-export it, or pass a model directory.")
    if "model_type" not in config:
        raise SentcompError(f"{model_dir}/config.json has no 'model_type'; cannot tell the architecture.")
    return family_module(config["model_type"]).from_hf(model_dir, config, name=source, **options)


# ------------------------------------------------------------------------- any causal family: build, untie, save


def init(model_type: str, hf_config: dict, rng=0, quad_head: bool = False, tokenizer=None) -> LanguageModel:
    """A randomly initialised causal LM of ``model_type`` (``"gpt2"`` or a shared-decoder family: ``"llama"``,
    ``"qwen2"``, ...), shaped by ``hf_config``, the family's Hugging Face ``config.json`` keys (the family's own
    defaults fill the rest). ``quad_head=True``: the Quad architecture (head at the identity, Φ untied)."""
    causal = causal_families()
    if model_type not in causal:
        raise SentcompError(f"Random {model_type!r} models are not available; choose one of {list(causal)}.")
    module = family_module(model_type)
    return module.init(module.config_from_hf(hf_config), rng, quad_head=quad_head, tokenizer=tokenizer)


def untie(lm: LanguageModel) -> LanguageModel:
    """``lm`` with Φ untied from the input embeddings (the new Φ starts as a copy of them, so the outputs do not
    change), as its family's facts say (``FamilyFacts.untie``); an untied model is returned as it is."""
    untie_fn = facts(lm.family).untie
    if untie_fn is None:
        raise SentcompError(f"Untying Φ is not implemented for {lm.family!r} models.")
    return untie_fn(lm) if lm.config.tie_word_embeddings else lm


def save_hf(lm: LanguageModel, directory: str | Path, replace: bool = False) -> Path:
    """Writes ``lm`` in its family's Hugging Face layout (the family module's ``save_hf``: ``config.json`` and
    safetensors, a Quad head included as sentcomp's own tensors) with its tokenizer, loadable by :func:`load`;
    ``config.json``'s ``bos_token_id``/``eos_token_id`` are the tokenizer's (a byte-level GPT-2 ends texts with
    id 256, not GPT-2's 50256).

    ``directory`` must be new or empty, so two models' files are never mixed; ``replace=True`` replaces what it
    holds (e.g. a training run's earlier export). The files are written into a sibling folder first and moved in
    place whole."""
    module = family_module(lm.family)
    if not hasattr(module, "save_hf"):
        raise SentcompError(f"Saving {lm.family!r} models in Hugging Face layout is not implemented.")
    directory = Path(directory)
    check_save_target(directory, replace)
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    module.save_hf(lm, staging)
    if lm.tokenizer is not None:
        if not (staging / "tokenizer_config.json").exists():
            lm.tokenizer.save_pretrained(str(staging))
        set_special_token_ids(staging / "config.json", lm.tokenizer)
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)
    return directory


def check_save_target(directory: Path, replace: bool) -> None:
    """``directory`` may receive a model: it is not a file, not under one, and (unless ``replace``) empty."""
    for path in (directory, *directory.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == directory else f"is under {path}, which is a file"
            raise SentcompError(f"Cannot save the model to {directory}: it {where}. Pass a new or empty directory.")
    held = sorted(entry.name for entry in directory.iterdir()) if directory.is_dir() else []
    if held and not replace:
        raise SentcompError(f"Cannot save the model to {directory}: it already holds {', '.join(held[:5])}"
                            f"{', ...' if len(held) > 5 else ''}, and mixing two models' files would load neither "
                            "correctly. Pass a new or empty directory, or delete this one first.")


def set_special_token_ids(config_path: Path, tokenizer) -> None:
    """Sets ``bos_token_id``/``eos_token_id`` of a saved ``config.json`` to ``tokenizer``'s (its EOS standing for
    BOS when it has none, as GPT-2's does)."""
    config = json.loads(config_path.read_text())
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    config.update({key: value for key, value in (("bos_token_id", bos), ("eos_token_id", eos)) if value is not None})
    config_path.write_text(json.dumps(config, indent=2))


RANDOM_GPT2 = "random-gpt2"  # config.model of smoke runs: a tiny random GPT-2 shaped by config.random_gpt2


def hf_model_config(model, vocab_size: int) -> dict:
    """A random model's shape (pretraining's ``config.model``: ``family``, ``n_layer``, ``n_embd``, ``n_head``,
    ``n_positions``, ``tie_word_embeddings`` and the family's own keys) as its family's Hugging Face ``config.json``
    keys (:func:`init`), as the
    family's ``FamilyFacts.pretrain_config`` maps them. GPT-2 (:func:`sentcomp.models.gpt2.pretrain_config`):
    ``n_positions``, ``n_embd``, ``n_layer``, ``n_head``. A rotary family (Llama, Qwen2, Mistral, Gemma, GPT-NeoX:
    :func:`sentcomp.models.decoder.pretrain_config`): the same four as ``max_position_embeddings``,
    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, and ``intermediate_size`` (0: the family's
    default width), ``num_key_value_heads`` (0: ``n_head``), ``rope_theta`` (absent: the family's default)."""
    to_hf = facts(model.family).pretrain_config
    if to_hf is None:
        raise SentcompError(f"{model.family!r} models cannot be pretrained from random weights: their family declares "
                            "no FamilyFacts.pretrain_config; choose a family that does (check_config lists them).")
    return to_hf(model, vocab_size)


def from_config(config) -> LanguageModel:
    """The model an experiment config names: ``config.model`` is any source :func:`load` accepts, or
    ``"random-gpt2"``, a random GPT-2 of shape ``config.random_gpt2`` (a dict of ``gpt2_config`` fields, with the
    real GPT-2 tokenizer) initialised from ``config.seed``, for smoke runs. An optional ``config.revision`` is the
    Hub revision of ``config.model``."""
    if config.model == RANDOM_GPT2:
        from sentcomp.models import gpt2

        return gpt2.init(gpt2.gpt2_config(**config.random_gpt2.to_dict()), rng=config.seed)
    return load(config.model, revision=config.get("revision", ""))


__all__ = ["LanguageModel", "FamilyFacts", "load", "from_config", "init", "hf_model_config", "untie", "save_hf",
           "facts", "causal_families", "FAMILIES", "ALIASES", "RANDOM_GPT2"]
