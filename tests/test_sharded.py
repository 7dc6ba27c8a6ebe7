"""Sharded indexing under torchrun: two CPU processes build the same index as one process does,
and a part file left by an interrupted run is merged, not lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from synthetic import write_photo_folder

from clipengine.index.info import index_info
from clipengine.index.pipeline import index_folder
from clipengine.index.search import Searcher
from clipengine.index.sharded import SHARDS_DIR, PartWriter
from clipengine.index.store import FileRecord, IndexStore


def stored(index) -> dict[str, np.ndarray]:
    with IndexStore.open(index) as store:
        ids, vectors = store.vectors()
        rows = store.rows(ids)
        return {rows[int(i)].path: v for i, v in zip(ids, vectors, strict=True)}


@pytest.mark.slow
def test_two_processes_build_the_index_one_process_builds(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    write_photo_folder(photos, 14, size=(96, 72))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    single = tmp_path / "single"
    index_folder(photos, single, model=tiny_model, workers=0)

    sharded = tmp_path / "sharded"
    # An interrupted earlier run left one rank's part file: its image must come back from it.
    extra = tmp_path / "extra.jpg"
    write_photo_folder(tmp_path / "x", 1, size=(96, 72), seed=500)[0].rename(extra)
    shutil.copytree(single, sharded)  # same model and manifest; then empty it of files
    with IndexStore.open(sharded, writable=True) as store:
        store.commit(remove_ids=[r.id for r in store.recorded_under(str(photos)).values()])
        vector = np.ones(store.dim, np.float32) / np.sqrt(store.dim)
    st = extra.stat()
    PartWriter(sharded, 1, len(vector))([FileRecord(str(extra), st.st_size, st.st_mtime_ns, "f" * 64, 96, 72, vector)])

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "clipengine", "index", str(photos), "--index", str(sharded), "--workers", "0", "--json"],
        capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]

    ours, theirs = stored(single), stored(sharded)
    assert np.allclose(theirs.pop(str(extra)), vector)  # the interrupted run's work was merged
    assert sorted(ours) == sorted(theirs)
    for path in ours:
        np.testing.assert_allclose(theirs[path], ours[path], atol=1e-5)
    assert [s["path"] for s in index_info(sharded).skipped_files] == [str(photos / "broken.jpg")]
    assert not (sharded / SHARDS_DIR).exists()
    query = ours[str(photos / "img_000003.jpg")]
    with Searcher(single) as a, Searcher(sharded) as b:
        expected = [h.path for h in a.search_vector(query, 5)]
        assert [h.path for h in b.search_vector(query, 6) if h.path != str(extra)][:5] == expected
