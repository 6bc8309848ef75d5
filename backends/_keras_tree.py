"""Layer paths and dimension roles for Keras 3 models.

A site path is a dotted chain from the model down to a layer. A child held by an attribute of
its parent is named after that attribute (leading underscores dropped, list items by index:
``transformer_layers.0.self_attention_layer``), like a PyTorch module path; any other child
(the layers of a Sequential or functional model) is named by its Keras ``name``, as
``model.get_layer(name)`` and ``model.summary()`` show it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import keras

from layerscope.core.naming import ROOT_SITE, default_roles, feature_role

# Keras' own bookkeeping attributes hold layers too (every tracked child, the functional graph
# of a Sequential); they must not lend their names to a child.
_INTERNAL_ATTRS = frozenset({
    "_layers", "_tracked", "_functional", "_operations", "_operations_by_depth", "_inputs",
    "_outputs", "_nodes", "_nodes_by_depth", "_inbound_nodes", "_outbound_nodes",
    "_input_layers", "_output_layers",
})

#: layer classes whose rank-3 outputs are (batch, width, channel), not (batch, token, hidden)
_SPATIAL_1D = (
    "Conv1D", "Conv1DTranspose", "SeparableConv1D", "DepthwiseConv1D", "MaxPooling1D",
    "AveragePooling1D", "UpSampling1D", "ZeroPadding1D", "Cropping1D", "SpatialDropout1D",
)


def _attribute_names(layer: Any) -> dict[int, str]:
    """id(child) -> the attribute path that holds it in ``layer`` (first one wins)."""
    names: dict[int, str] = {}

    def claim(child: Any, name: str) -> None:
        if isinstance(child, keras.layers.Layer):
            names.setdefault(id(child), name)

    own = vars(layer)
    # On PyTorch, Keras layers are torch modules: an attribute holding a layer lives in
    # torch's ``_modules`` registry under the attribute's name, not in ``vars``.
    for attr, value in {**own.get("_modules", {}), **own}.items():
        if attr in _INTERNAL_ATTRS or attr == "_modules":
            continue
        clean = attr.lstrip("_") or attr
        if attr.startswith("_self_") and not isinstance(value, keras.layers.Layer):
            continue  # TensorFlow's tracking containers; ``_self_attention_layer`` is a child
        if isinstance(value, keras.layers.Layer):
            claim(value, clean)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                claim(item, f"{clean}.{index}")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                claim(item, f"{clean}.{key}")
    return names


def children(layer: Any) -> list[tuple[str, Any]]:
    """(name, child) for the direct sublayers of ``layer``, in Keras' tracking order."""
    if isinstance(layer, keras.layers.RNN):
        return []  # cells run once per time step inside the RNN's loop: not a layer site
    tracked = [c for c in layer._flatten_layers(include_self=False, recursive=False)
               if not isinstance(c, keras.layers.InputLayer)]
    by_attribute = _attribute_names(layer)
    named: list[tuple[str, Any]] = []
    taken: set[str] = set()
    for child in tracked:
        name = by_attribute.get(id(child), child.name)
        if name in taken:  # two siblings with one name: keep paths unique
            suffix = 2
            while f"{name}_{suffix}" in taken:
                suffix += 1
            name = f"{name}_{suffix}"
        taken.add(name)
        named.append((name, child))
    return named


def named_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """(path, layer) for ``model`` (path ``""``) and every layer below it, each layer once."""
    seen: set[int] = set()

    def walk(prefix: str, layer: Any) -> Iterator[tuple[str, Any]]:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        yield prefix, layer
        for name, child in children(layer):
            yield from walk(f"{prefix}.{name}" if prefix else name, child)

    yield from walk("", model)


def site_of(path: str) -> str:
    return path or ROOT_SITE


def _channels_first(layer: Any) -> bool:
    data_format = getattr(layer, "data_format", None)
    if data_format is None:
        data_format = keras.config.image_data_format()
    return data_format == "channels_first"


#: where a layer sits relative to an attention layer: not inside one,
#: inside one, a sublayer that sees its (batch, head, query, key) scores, or a projection
#: with (batch, token, head, head size) outputs
OUTSIDE, INSIDE, SCORES, PROJECTION = "outside", "inside", "scores", "projection"


def place_in_attention(sublayer: Any, scores: set[int]) -> str:
    """The place of ``sublayer`` of an attention layer (``scores``: ids of the layers that see
    the score map)."""
    if id(sublayer) in scores:
        return SCORES
    if isinstance(sublayer, keras.layers.EinsumDense) or "Rotary" in type(sublayer).__name__:
        return PROJECTION  # the query/key/value projections and the rotary embedding
    return INSIDE


def roles_for(layer: Any, kind: str, shape: tuple[int, ...], hidden_size: int | None,
              place: str = OUTSIDE) -> tuple[str, ...]:
    """Role names for each axis of a tensor taken as ``kind`` at ``layer`` (batch first)."""
    ndim = len(shape)
    if ndim == 0:
        return ()
    if kind.startswith("attention"):
        return ("batch", "head", "query", "key") if ndim == 4 else default_roles(ndim)
    if ndim == 1:
        return ("batch",)
    if place != OUTSIDE and ndim == 4:
        # inside an attention layer: projections are (batch, token, head, head size), the
        # softmax sees the (batch, head, query, key) score map; anything else is not guessed
        if place == PROJECTION:
            return ("batch", "token", "head", "axis3")
        if place == SCORES:
            return ("batch", "head", "query", "key")
        return default_roles(ndim)
    if ndim == 2:
        return ("batch", feature_role(shape[-1], hidden_size))
    if ndim == 3:
        if type(layer).__name__.startswith(_SPATIAL_1D):
            return ("batch", "channel", "width") if _channels_first(layer) else \
                ("batch", "width", "channel")
        return ("batch", "token", feature_role(shape[-1], hidden_size))
    spatial = {4: ("height", "width"), 5: ("depth", "height", "width")}.get(ndim)
    if spatial is None:
        return default_roles(ndim)
    if _channels_first(layer):
        return ("batch", "channel", *spatial)
    return ("batch", *spatial, "channel")  # Keras' default NHWC layout, kept as stored
