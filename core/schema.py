"""The names a trace's root document uses: schema version, statuses, coordinates, attributes.

Kept apart from :mod:`.format` (codecs and store options, which import numpy through the
chunk and gathering policies) and importing nothing, so that reading a root document
(:mod:`.validate`, ``layerscope info``) starts fast. :mod:`.format` re-exports every name.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1
STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"
STATUS_ABORTED = "aborted"
#: the status of a tombstone: the root document of a store that mode="w" is replacing (its
#: old contents are being deleted); it holds no trace, and mode="w" replaces it
STATUS_REPLACING = "replacing"

#: Coordinates every trace may carry besides the captured variables.
BATCH = "batch"
TOKEN_TEXT = "token_text"
TOKEN_ID = "token_id"
INPUT_TEXT = "input_text"
#: a traced ``generate()``: the step that made each position (0: the prompt, k: the k-th
#: generated token)
TOKEN_STEP = "token_step"
#: (batch, token) bool: True where a sample has a real token (its attention mask); False at
#: padding and past the length of the pass it came in (passes of different lengths share
#: one store, core/growth.py)
TOKEN_MASK = "token_mask"
#: the decoder's tokens of an encoder-decoder model, on the ``decoder_token`` axis
DECODER_TOKEN_TEXT = "decoder_token_text"
DECODER_TOKEN_ID = "decoder_token_id"
DECODER_TOKEN_STEP = "decoder_token_step"
DECODER_TOKEN_MASK = "decoder_token_mask"

#: Group attribute: ``{"<site>@<kind>": reason}`` for each tensor a backend offered but the
#: recorder did not store, e.g. a position or rotary embedding without a batch axis.
SKIPPED = "skipped"


def skipped_sites(attrs: dict[str, Any]) -> dict[str, str]:
    """The ``skipped`` record of a store's attributes (empty in stores written before it)."""
    record = attrs.get(SKIPPED)
    if not isinstance(record, dict):
        return {}
    return {str(name): str(reason) for name, reason in record.items()}
