"""The files a run writes, and the content hashes that key its caches.

Every file is written **atomically and durably**: the bytes go to a temporary file in the same folder, are
flushed and fsynced, and the temporary file is renamed over the target, so a reader (a resumed run, another
host on a shared filesystem) sees the old file or the new one, never half of one. Logs that grow line by line
(``metrics.jsonl``, ``cells.jsonl``) are appended with one fsynced write per line; their readers
(:func:`read_json_lines`) skip a torn line with a warning naming it. :func:`write_failure_cause` tells a write
that cannot succeed until the user acts (no space, no permission) from other errors.

:func:`content_hash` is the one hash behind every cache key (features, corpora, BERT features): SHA-256 over
the length-prefixed parts (bytes as they are, anything else as sorted-key JSON), so ``("ab", "c")`` and
``("a", "bc")`` differ. Only the file-writing helpers do I/O; none imports JAX.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HASH_LENGTH = 20  # hex digits kept: 80 bits, ample for cache keys


def content_hash(*parts: Any) -> str:
    """``sha256(len(p₁) ‖ p₁ ‖ len(p₂) ‖ p₂ ‖ ...)`` in hex, first :data:`HASH_LENGTH` digits; a part is its bytes
    if it is ``bytes``, else its JSON (sorted keys, ``str`` for what JSON cannot encode)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:HASH_LENGTH]


def code_fingerprint(*module_names: str) -> str:
    """:func:`content_hash` of the source files of the named modules, in order: part of a cache key, so results
    computed by earlier code (before a model or kernel fix) are never served as if the current code made them.
    Any edit of those files, comments included, invalidates the cache: recomputing is the safe side."""
    return content_hash(*(_source_file(name).read_bytes() for name in module_names))


def _source_file(module_name: str) -> Path:
    """The file an imported module was loaded from (a namespace package has none: name its modules instead)."""
    file = importlib.import_module(module_name).__file__
    if file is None:
        raise ValueError(f"Module {module_name} has no source file (a namespace package): name its modules.")
    return Path(file)


def flatten(tree: Mapping[str, Any], prefix: str = "", separator: str = ".") -> dict[str, Any]:
    """Nested settings or records as one level of keys joined by ``separator``: ``{"a": {"b": 1}} -> {"a.b": 1}``
    (lists, scalars and empty mappings are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}{separator}", separator))
        else:
            flat[f"{prefix}{key}"] = value
    return flat




def is_under(key: str, names: Sequence[str]) -> bool:
    """Whether the dotted ``key`` is one of ``names`` or lies under one (``"mesh.fsdp"`` is under ``"mesh"``)."""
    return any(key == name or key.startswith(name + ".") for name in names)


def settings_fingerprint(settings: Mapping[str, Any], ignore: Sequence[str] = ()) -> str:
    """:func:`content_hash` of the settings (e.g. ``config.to_dict()``) minus the dotted keys in ``ignore`` (and
    everything under them): what a resumed result is keyed by, so one computed under other settings is never
    returned."""
    kept = {key: value for key, value in flatten(settings).items() if not is_under(key, ignore)}
    return content_hash(kept)


def path_fingerprint(path: str | Path) -> str:
    """:func:`content_hash` of the names, sizes and modification times of the files at ``path`` (a file or a
    directory, recursively): cheap, and it changes when the files are rewritten (e.g. a model directory whose
    weights a new training run replaced)."""
    path = Path(path)
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    return content_hash([(str(p.relative_to(path) if p != path else p.name), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in files])


def texts_fingerprint(texts: Sequence[str]) -> str:
    """:func:`content_hash` of the texts' UTF-8 bytes, in order."""
    return content_hash(*(text.encode() for text in texts))


def _default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it, and renames it to ``path``; the file
    gets the permissions a plain ``open`` would give it (temporary files are private, ``0o600``)."""
    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        try:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
            os.fchmod(tmp.fileno(), _default_file_mode())
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically and durably."""
    _write_atomically(Path(path), lambda file: file.write(data))


def write_text(path: str | Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically and durably."""
    write_bytes(path, text.encode())


def write_json(path: str | Path, value: Any) -> None:
    """Writes ``value`` as indented JSON, atomically and durably."""
    write_text(path, json.dumps(value, indent=2))


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Writes ``array`` in ``.npy`` format atomically and durably (never a truncated chunk)."""
    _write_atomically(Path(path), lambda file: np.save(file, array))


def read_json_lines(path: str | Path) -> list[Any]:
    """The rows of a JSON-lines log (``metrics.jsonl``, ``cells.jsonl``); [] if the file does not exist.

    A line that is not valid JSON (a torn last line left by a kill or a full disk mid-append) is skipped with a
    warning naming the file and line: what it held is recomputed by the run that reads the log."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}, line {number}: not valid JSON (a torn write); skipped.", stacklevel=2)
    return rows


def read_json_file(path: str | Path, what: str, kind: type = dict) -> Any:
    """The JSON value of type ``kind`` in ``path``, or None if the file is missing, empty, not valid JSON or of
    another type (then a warning names the file and says ``what`` follows, e.g. ``"the run runs again"``)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, kind):
            raise ValueError(f"a JSON {type(value).__name__}, expected a {kind.__name__}")
        return value
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        warnings.warn(f"{path} is unreadable ({type(error).__name__}: {error}); {what}.", stacklevel=2)
        return None


# errno values that mean a write cannot succeed until the user acts (free space, fix permissions or quota)
WRITE_FAILURES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "read-only file system"}


def write_failure_cause(error: BaseException) -> str | None:
    """The cause of a failed write when it is one the user must fix (:data:`WRITE_FAILURES`), found in the
    exception, its causes and contexts, or the text of a wrapped error (TensorStore reports OS errors as text);
    None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_FAILURES:
            return f"{WRITE_FAILURES[current.errno]} ({current})"
        for code, cause in WRITE_FAILURES.items():
            if os.strerror(code) in str(current):
                return f"{cause} ({str(current).splitlines()[0][:300]})"
        current = current.__cause__ or current.__context__
    return None


def copy_file(source: str | Path, path: str | Path) -> None:
    """Copies ``source`` to ``path`` atomically and durably, with the permissions a plain ``open`` gives."""
    _write_atomically(Path(path), lambda file: file.write(Path(source).read_bytes()))


def append_json_line(path: str | Path, row: dict[str, Any]) -> None:
    """Appends ``row`` as one JSON line, flushed and fsynced before returning. After a torn last line (a kill or a
    full disk mid-append left it without its newline) the row starts a line of its own, so it is not glued to the
    fragment (which :func:`read_json_lines` skips with a warning)."""
    with open(path, "a+b") as file:
        torn = file.tell() > 0 and (file.seek(-1, os.SEEK_END), file.read(1))[1] != b"\n"
        file.write((("\n" if torn else "") + json.dumps(row) + "\n").encode())
        file.flush()
        os.fsync(file.fileno())
