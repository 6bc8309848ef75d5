"""Keras on TensorFlow inside a graph (``tf.function``, ``model.predict``): tensors are symbolic.

The wrappers only collect the tensors while the graph is traced; the model's top-level call
then appends one ``tf.py_function`` that receives their values when the graph runs and
records the whole pass. Imported only when Keras runs on TensorFlow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

#: what the recording op hands back per tensor: (site, kind, layer, place in attention, attrs,
#: roles: () when the tensor is stored whole, its roles being found from the layer then)
Meta = tuple[str, str, Any, str, Any, tuple[str, ...]]


class GraphPass:
    """Tensors collected while one top-level call is traced into a graph."""

    def __init__(self) -> None:
        self.graph = tf.compat.v1.get_default_graph()
        self.metas: list[Meta] = []
        self.tensors: list[Any] = []

    def collect(self, meta: Meta, tensor: Any) -> bool:
        """Keep ``tensor`` for the recording op; False when its value never leaves a loop or
        branch body of the graph (it cannot be handed to an op outside it)."""
        if isinstance(tensor, np.ndarray):
            tensor = tf.constant(tensor)
        if tensor.graph is not self.graph:
            return False
        self.metas.append(meta)
        self.tensors.append(tensor)
        return True

    def record_when_run(self, probe: Any, ids: Any, replay: Callable[..., list[Any]],
                        mask: Any = None) -> None:
        """Append the op that calls ``replay(metas, has_ids, has_mask, batch, *values)`` when
        the graph runs. tf.function runs every stateful op, in program order, so passes
        arrive in the order the model was called."""
        head = [tf.shape(probe)[0]] + [tf.convert_to_tensor(t) for t in (ids, mask)
                                       if t is not None]
        call = functools.partial(replay, tuple(self.metas), ids is not None, mask is not None)
        tf.py_function(call, head + self.tensors, Tout=[], name="layerscope_record")
