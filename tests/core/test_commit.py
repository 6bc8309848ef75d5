"""The root document a commit publishes (core/commit.py)."""

from __future__ import annotations

import json

import numpy as np

from layerscope.core.commit import EntryCache, root_document

from .test_writer import make_recorder


def test_kept_entries_give_the_same_bytes_at_every_commit():
    attrs = {"status": "writing", "committed_batches": 3, "note": "ünïcode"}
    arrays = {
        "b@output": {"shape": [0, 5, 8], "dimension_names": ["batch", "token", "hidden"],
                     "fill_value": "NaN", "attributes": {"rows": 8070450532247928833}},
        "a@output": {"shape": [0, 4], "dimension_names": ["batch", "hidden"],
                     "fill_value": 0.0, "attributes": {}},
        "token": {"shape": [5], "dimension_names": ["token"], "fill_value": 0},
    }
    cache = EntryCache()
    for rows in (0, 4, 8, 123456):
        assert root_document(attrs, arrays, rows, cache) == root_document(attrs, arrays, rows)
    # a document replaced (an attribute added, a token axis grown) is encoded again
    arrays["a@output"] = {**arrays["a@output"], "attributes": {"gathered_batches": 4}}
    kept = root_document(attrs, arrays, 9, cache)
    assert kept == root_document(attrs, arrays, 9)
    doc = json.loads(kept)["consolidated_metadata"]["metadata"]
    assert doc["a@output"]["attributes"] == {"gathered_batches": 4}
    assert doc["a@output"]["shape"] == [9, 4] and doc["token"]["shape"] == [5]


def test_a_writers_commits_publish_what_it_wrote(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    for number in range(3):
        recorder.begin_pass(2)
        recorder.put("block", "output", np.full((2, 3, 4), number, np.float32),
                     ("batch", "token", "hidden"))
        recorder.end_pass()
    recorder.close()
    root = json.loads((path / "zarr.json").read_bytes())
    assert root["consolidated_metadata"]["metadata"]["block@output"]["shape"] == [6, 3, 4]
    assert root["attributes"]["committed_batches"] == 3
