"""Reading Hugging Face-format checkpoints: resolve a source to a local directory, read its config, tensors and
tokenizer, and assign the tensors to a parameter pytree through an explicit name map with shape checks; find the
offline models that pip packages ship (:func:`packaged_file`)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sentcomp.errors import SentcompError


def resolve_hub_or_dir(source: str, revision: str = "") -> Path:
    """A local directory as is; otherwise a Hub repo name, downloaded (or found in the cache) by huggingface-hub at
    ``revision`` (a branch, tag or commit, e.g. Pythia's ``"step1000"``; ``""`` = the default branch)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if revision:
            raise SentcompError(f"{source!r} is a local directory; a revision ({revision!r}) applies to Hub names "
                                "only. Pass each checkpoint's directory as the source, without a revision.")
        return path
    if path.exists():
        raise SentcompError(f"{source!r} is a file, not a model directory; pass the directory holding config.json.")
    if not looks_like_hub_name(source):
        raise SentcompError(f"Model directory {source!r} does not exist (and it is not a Hub name 'org/name').")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                source, revision=revision or None,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "pytorch_model.bin"],
            )
        )
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            f"HF_HUB_OFFLINE is set and the model{f' at revision {revision!r}' if revision else ''} is not in the "
            "local Hugging Face cache"
            if offline
            else f"the Hub could not be reached or has no such repo{' or revision' if revision else ''}"
        )
        at = f" (revision {revision!r})" if revision else ""
        raise SentcompError(
            f"Cannot load model {source!r}{at}: it is not a local directory and {hint}. Pass a local directory in "
            f"HF format (config.json + model.safetensors), or download it first on a machine with network "
            f"({type(error).__name__}: {error})."
        ) from None


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_name(source: str) -> bool:
    """Whether ``source`` can be a Hub repo name (``name`` or ``org/name``: letters, digits, ``-``, ``_``, ``.``);
    anything else (an absolute path, ``./x``, ``~/x``, ``a/b/c``, a trailing ``/``) is meant as a local path."""
    return bool(_HUB_NAME.match(source)) and not source.endswith((".", "/")) and ".." not in source


def check_source(source: str, revision: str = "", known: tuple[str, ...] = ()) -> None:
    """Cheap check, before any work, that a model ``source`` can be loaded here: a name in ``known`` (aliases)
    passes; a ``.gguf`` file must exist; a local directory must hold a readable ``config.json`` (or ``model/``
    with one: a training run's workdir); a Hub name must be in the local cache when ``HF_HUB_OFFLINE`` is set.
    Raises :class:`SentcompError` saying what is missing; the weights are checked when the model loads."""
    if source in known:
        return
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise SentcompError(f"Model file {source!r} does not exist.")
        return
    if path.is_dir():
        read_config(path / "model" if (path / "model" / "config.json").is_file() else path)
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if offline or not looks_like_hub_name(source) or path.exists():  # online, a Hub name is checked on download
        resolve_hub_or_dir(source, revision)


def packaged_file(package: str, inside: str, what: str, version: str | None = None) -> Path:
    """The file ``inside`` the installed pip package ``package`` (an offline model); a clear error naming ``what``
    it is and the install command (``version`` pinned, if given) when the package or the file is missing."""
    install = f"pip install --no-deps {package}" + (f"=={version}" if version else "")
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise SentcompError(
            f"{what} comes from the {package!r} package, which is not installed: run `{install}`."
        ) from None
    path = Path(str(distribution.locate_file(inside)))
    if not path.is_file():
        raise SentcompError(f"The {package!r} package lacks {inside}; reinstall it: `{install}`.")
    return path


def read_config(model_dir: Path) -> dict[str, Any]:
    """The directory's ``config.json`` as a dict."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise SentcompError(f"{model_dir} has no config.json: expected a Hugging Face model directory.")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SentcompError(f"{config_path} is not valid JSON ({error}): restore the model's config.json.") from None
    if not isinstance(config, dict):
        raise SentcompError(f"{config_path} holds a {type(config).__name__}, expected a JSON object of settings.")
    return config


def read_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` (also sharded ``model-*.safetensors``) or ``pytorch_model.bin``, float32."""
    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        from safetensors.numpy import load_file

        state: dict[str, np.ndarray] = {}
        for shard in shards:
            try:
                state.update(load_file(shard))
            except Exception as error:  # safetensors raises its own SafetensorError (and OSError) for bad bytes
                raise SentcompError(f"{shard} cannot be read ({type(error).__name__}: {error}): the weights file is "
                                    "truncated or corrupt; copy or download it again.") from None
        return {name: np.asarray(value, np.float32) for name, value in state.items()}
    bin_path = model_dir / "pytorch_model.bin"
    if bin_path.is_file():
        try:
            import torch
        except ImportError:
            raise SentcompError(
                f"{bin_path} is a PyTorch pickle; reading it needs torch (pip install torch==2.13.0), or convert "
                "the checkpoint to model.safetensors."
            ) from None
        tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        return {name: value.float().numpy() for name, value in tensors.items()}
    raise SentcompError(f"{model_dir} has neither model.safetensors nor pytorch_model.bin.")


def read_tokenizer(model_dir: Path, markers: tuple[str, ...]):
    """The tokenizer saved in the directory (``transformers.AutoTokenizer``) if one of the ``markers`` files (e.g.
    ``tokenizer.json``) is there, else None."""
    if not any((model_dir / name).is_file() for name in markers):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def assign(
    state: Mapping[str, np.ndarray],
    name_map: Mapping[str, tuple[str, tuple[int, ...]]],
    source: str,
    ignored_prefixes: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Picks tensors by an explicit name map ``{our_name: (checkpoint_name, expected_shape)}`` and checks shapes.

    Every mapped tensor must be present with its expected shape, and every checkpoint tensor must be mapped
    (unless its name starts with one of ``ignored_prefixes``, e.g. buffers like GPT-2's ``attn.bias`` mask).
    Returns ``{our_name: array}``; raises one error listing every problem.
    """
    problems = []
    out = {}
    for ours, (theirs, shape) in name_map.items():
        if theirs not in state:
            problems.append(f"missing tensor {theirs!r}")
        elif tuple(state[theirs].shape) != tuple(shape):
            problems.append(f"{theirs!r} has shape {tuple(state[theirs].shape)}, expected {tuple(shape)}")
        else:
            out[ours] = state[theirs]
    used = {theirs for theirs, _ in name_map.values()}
    extra = sorted(n for n in state if n not in used and not n.startswith(ignored_prefixes))
    problems += [f"unexpected tensor {name!r}" for name in extra]
    if problems:
        raise SentcompError(f"Checkpoint {source} does not match the model config: " + "; ".join(problems))
    return out
