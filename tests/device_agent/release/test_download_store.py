"""Chunks on disk: only the signed hash is kept, a restart resumes, a damaged or re-cut download starts afresh."""

from __future__ import annotations

import hashlib
from pathlib import Path

from device_agent.release.download_store import DownloadStore
from device_agent.release.release_info import ReleaseInfo, chunk_digests, release_path

DATA = bytes(range(256)) * 12  # 3,072 bytes: chunks of 1,024


def info(number: int = 1, chunk_size: int = 1024, data: bytes = DATA) -> ReleaseInfo:
    return ReleaseInfo(path=release_path(number), length=len(data), sha256=hashlib.sha256(data).hexdigest(),
                       release=number, bundle_version=number, model_name="m", fleet="f", expires_ms=1,
                       chunk_size=chunk_size, chunk_sha256=chunk_digests(data, chunk_size))


def test_download_keeps_only_signed_chunks_and_resumes(tmp_path: Path) -> None:
    store = DownloadStore(tmp_path)
    download = store.begin(info())
    assert download.missing() == [0, 1, 2] and download.progress_pct == 0
    assert download.add(1, DATA[1024:2048]).stored
    assert download.add(1, DATA[1024:2048]).reason == "duplicate"
    assert download.add(0, b"X" + DATA[1:1024]).reason == "hash_mismatch"
    assert download.add(5, b"").reason == "out_of_range"
    assert not (tmp_path / info().sha256 / "0.chunk").exists()
    again = DownloadStore(tmp_path).begin(info())  # a restart
    assert again.missing() == [0, 2] and again.received == 1 and again.progress_pct == 33
    for index in (0, 2):
        assert again.add(index, DATA[index * 1024:(index + 1) * 1024]).stored
    assert again.complete and again.read_all() == DATA


def test_download_drops_damaged_chunks_and_restarts_a_recut_plan(tmp_path: Path) -> None:
    store = DownloadStore(tmp_path)
    first = store.begin(info())
    first.add(0, DATA[:1024])
    (tmp_path / info().sha256 / "0.chunk").write_bytes(b"rotten")
    assert store.begin(info()).missing() == [0, 1, 2], "a chunk damaged on disk is dropped"
    store.begin(info()).add(0, DATA[:1024])
    assert store.begin(info(chunk_size=2048)).missing() == [0, 1], "the same bundle cut differently starts afresh"


def test_download_store_keeps_a_bounded_number_of_downloads(tmp_path: Path) -> None:
    store = DownloadStore(tmp_path, max_downloads=2)
    for number in range(1, 5):
        store.begin(info(number, data=DATA + bytes([number])))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    store.discard(info(4, data=DATA + bytes([4])).sha256)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
