"""The root document a commit publishes (core/commit.py)."""

from __future__ import annotations

import json

import numpy as np

from layerscope.core.commit import EntryCache, root_document

from .test_writer import make_recorder


def plainly(attrs, arrays, rows):
    """The root document as ``json.dumps`` writes it, every array cut to ``rows``."""
    metadata = {name: {**doc, "shape": [rows, *doc["shape"][1:]]}
                if (doc.get("dimension_names") or [None])[0] == "batch" else doc
                for name, doc in sorted(arrays.items())}
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs,
                       "consolidated_metadata": {"kind": "inline", "must_understand": False,
                                                 "metadata": metadata}},
                      allow_nan=False).encode()


def test_kept_entries_give_the_bytes_json_gives_at_every_commit():
    attrs = {"status": "writing", "committed_batches": 3, "note": "ünïcode"}
    arrays = {
        # the number that stands for the batch length, inside the document itself
        "b@output": {"shape": [0, 5, 8], "dimension_names": ["batch", "token", "hidden"],
                     "fill_value": "NaN", "attributes": {"rows": 8070450532247928833}},
        "a@output": {"shape": [0, 4], "dimension_names": ["batch", "hidden"],
                     "fill_value": 0.0, "attributes": {}},
        "token": {"shape": [5], "dimension_names": ["token"], "fill_value": 0},
    }
    cache = EntryCache()
    for rows in (0, 4, 8, 123456):
        assert root_document(attrs, arrays, rows, cache) == plainly(attrs, arrays, rows)
        assert root_document(attrs, arrays, rows) == plainly(attrs, arrays, rows)
    # a document replaced (an attribute added, a token axis grown) is encoded again
    arrays["a@output"] = {**arrays["a@output"], "attributes": {"gathered_batches": 4}}
    kept = root_document(attrs, arrays, 9, cache)
    assert kept == plainly(attrs, arrays, 9)
    doc = json.loads(kept)["consolidated_metadata"]["metadata"]
    assert doc["a@output"]["attributes"] == {"gathered_batches": 4}
    assert doc["a@output"]["shape"] == [9, 4] and doc["token"]["shape"] == [5]
    assert json.loads(root_document(attrs, {}, 0))["consolidated_metadata"]["metadata"] == {}


def test_an_entry_kept_from_a_new_arrays_text_gives_the_bytes_json_gives():
    """A new array's ``zarr.json`` text seeds its entry; text that is not a document of no
    rows with its shape first is not kept (the entry is encoded as before)."""
    arrays = {
        "new@output": {"shape": [0, 5], "dimension_names": ["batch", "hidden"],
                       "attributes": {"site": "ünïcode", "n": 10}},
        "grown@output": {"shape": [3, 5], "dimension_names": ["batch", "hidden"]},
        "tokens": {"shape": [0, 2], "dimension_names": ["token", "batch"]},
        "later@output": {"dimension_names": ["batch"], "shape": [0]},
        "zeros@output": {"shape": [0], "dimension_names": ["batch"], "fill_value": 0},
    }
    cache = EntryCache()
    for name, doc in arrays.items():
        cache.seed(name, doc, json.dumps(doc, allow_nan=False))
    for name in ("grown@output", "tokens", "later@output"):
        assert name not in cache._entries, name
    for name in ("new@output", "zeros@output"):  # kept: not encoded again
        assert cache._entries[name][0] is arrays[name], name
    for rows in (0, 7, 100):
        assert root_document({}, arrays, rows, cache) == plainly({}, arrays, rows)


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
