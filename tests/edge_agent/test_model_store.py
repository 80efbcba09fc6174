"""Model updates on the device's disk: chunks checked on arrival, kept across restarts,
joined and checked whole; the active model swapped atomically, the previous one kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.model_store import MODEL_FILE, ModelStore
from edge_tier.control import ModelRefused, model_update
from edge_tier.model.manifest import load_model
from tests.support import new_prefilter


def _update(tmp_path: Path, version: str, seed: int):  # type: ignore[no-untyped-def]
    manifest = new_prefilter(tmp_path / f"src-{version}", version, seed=seed)
    return model_update("acme", manifest, chunk_bytes=1024)


def test_chunks_are_checked_kept_across_a_restart_and_joined_into_a_loadable_model(tmp_path: Path) -> None:
    u, chunks = _update(tmp_path, "2.0.0", 1)
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelRefused, match=r"chunk 0 .* does not match its signed sha256"):
        store.put_chunk(u, 0, chunks[1])
    with pytest.raises(ModelRefused, match="does not exist"):
        store.put_chunk(u, len(chunks), b"")
    for i in range(0, len(chunks), 2):
        store.put_chunk(u, i, chunks[i])
    # a restart: a new store on the same directory knows what it has; a damaged chunk is dropped
    (tmp_path / "models" / "incoming" / u.sha256 / "2").write_bytes(b"bit rot")
    (tmp_path / "models" / "incoming" / u.sha256 / "4.tmp").write_bytes(b"half a write")
    again = ModelStore(tmp_path / "models")
    have = again.chunks_have(u)
    assert have == set(range(0, len(chunks), 2)) - {2}
    for i in set(range(len(chunks))) - have:
        again.put_chunk(u, i, chunks[i])
    manifest = again.install(u)
    assert load_model(manifest, "prefilter").data == b"".join(chunks)
    assert not (tmp_path / "models" / "incoming" / u.sha256).exists()


def test_activation_keeps_one_previous_model_and_demotion_rolls_back_to_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    shas = []
    for n in range(3):
        u, chunks = _update(tmp_path, f"{n + 2}.0.0", n)
        for i, c in enumerate(chunks):
            store.put_chunk(u, i, c)
        store.install(u)
        store.activate(u.sha256)
        shas.append(u.sha256)
    assert [sha for sha, _ in store.candidates()] == [shas[2], shas[1]]
    assert not (tmp_path / "models" / shas[0]).exists(), "models older than the previous are removed"
    store.demote(shas[2])
    assert [sha for sha, _ in store.candidates()] == [shas[1]]
    pointer = json.loads((tmp_path / "models" / "active.json").read_text())
    assert pointer == {"current": shas[1], "previous": None}


def test_joined_chunks_that_do_not_match_the_signed_file_are_refused(tmp_path: Path) -> None:
    u, chunks = _update(tmp_path, "2.0.0", 1)
    store = ModelStore(tmp_path / "models")
    for i, c in enumerate(chunks):
        store.put_chunk(u, i, c)
    (tmp_path / "models" / "incoming" / u.sha256 / "0").write_bytes(b"x" * len(chunks[0]))  # behind its back
    with pytest.raises(ModelRefused, match="joined chunks do not match"):
        store.install(u)
    assert store.chunks_have(u) == set() and store.candidates() == []


def test_the_manifest_written_names_only_the_file_beside_it(tmp_path: Path) -> None:
    u, chunks = _update(tmp_path, "2.0.0", 1)
    entry = {**u.manifest["prefilter"], "file": "../../etc/passwd"}
    evil = u.model_copy(update={"manifest": {**u.manifest, "prefilter": entry}})
    store = ModelStore(tmp_path / "models")
    for i, c in enumerate(chunks):
        store.put_chunk(evil, i, c)
    manifest = json.loads(store.install(evil).read_text())
    assert manifest["prefilter"]["file"] == MODEL_FILE
