"""results.storage: content hashes against hashlib, and writes that are atomic (a failure keeps the old file)."""

import hashlib
import json

import numpy as np
import pytest

from sentcomp.results import storage


def reference_hash(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little") + chunk)
    return digest.hexdigest()[:20]


def test_content_hash_is_length_prefixed_sha256_of_bytes_or_sorted_json():
    assert storage.content_hash(b"ab", b"c") == reference_hash(b"ab", b"c")
    assert storage.content_hash("ab", "c") != storage.content_hash("a", "bc")
    assert storage.content_hash({"b": 1, "a": [2]}) == reference_hash(b'{"a": [2], "b": 1}')
    assert storage.texts_fingerprint(["héllo", ""]) == reference_hash("héllo".encode(), b"")


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    storage.write_json(path, {"a": 1})
    storage.write_json(path, {"a": 2})
    storage.save_npy(tmp_path / "x.npy", np.arange(3))
    assert json.loads(path.read_text()) == {"a": 2}
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "x.npy"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "chunk.npy"
    storage.save_npy(path, np.ones(4))

    def half_written(file, array):
        file.write(b"\x93NUMPY partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "save", half_written)
    with pytest.raises(OSError, match="No space"):
        storage.save_npy(path, np.zeros(4))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["chunk.npy"]


def test_append_json_line_adds_one_line_per_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    storage.append_json_line(path, {"step": 1})
    storage.append_json_line(path, {"step": 2, "loss": 0.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, {"step": 2, "loss": 0.5}]


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    storage.write_text(tmp_path / "atomic.txt", "x")
    storage.save_npy(tmp_path / "atomic.npy", np.zeros(1))
    expected = (tmp_path / "plain.txt").stat().st_mode
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "atomic.npy").stat().st_mode == expected


def test_code_fingerprint_hashes_module_sources_and_refuses_a_namespace_package(tmp_path, monkeypatch):
    (tmp_path / "fingerprinted").mkdir()  # no __init__.py: a namespace package, which has no source file
    (tmp_path / "fingerprinted" / "module.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = (tmp_path / "fingerprinted" / "module.py").read_bytes()
    assert storage.code_fingerprint("fingerprinted.module") == storage.content_hash(source)
    with pytest.raises(ValueError, match="Module fingerprinted has no source file"):
        storage.code_fingerprint("fingerprinted")
