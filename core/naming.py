"""Variable names and the shared dimension vocabulary.

A captured tensor becomes the variable ``<site>@<kind>``. ``site`` is the framework's own
module path (dots); ``kind`` says what was taken there (``output``, ``input``, ``attention``,
``grad`` or a reduction name, with a ``.<part>`` suffix for one element of a tuple or dict).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

from .errors import CaptureError

SEPARATOR = "@"
ROOT_SITE = "root"

#: Dimension names every backend uses; a trace from any framework speaks this vocabulary.
_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_FORBIDDEN = re.compile(r"[/\\]")


@dataclass(frozen=True)
class VariableName:
    site: str
    kind: str

    def __str__(self) -> str:
        return f"{self.site}{SEPARATOR}{self.kind}"


def variable_name(site: str, kind: str) -> str:
    """Return the store name of the tensor taken as ``kind`` at ``site``."""
    site = site or ROOT_SITE
    if _FORBIDDEN.search(site) or _FORBIDDEN.search(kind) or SEPARATOR in site:
        raise CaptureError(
            f"site {site!r} / kind {kind!r} contains '/', '\\' or '@'; "
            "rename the module or choose another kind"
        )
    return f"{site}{SEPARATOR}{kind}"


def parse_variable_name(name: str) -> VariableName:
    """Split ``<site>@<kind>``; raises for names that are coordinates, not captures."""
    site, sep, kind = name.rpartition(SEPARATOR)
    if not sep or not site:
        raise CaptureError(f"{name!r} is not a captured variable (expected '<site>@<kind>')")
    return VariableName(site, kind)


def is_capture(name: str) -> bool:
    return SEPARATOR in name


def layer_index(site: str) -> int | None:
    """The first number in a dotted path: the index of a repeated block (``encoder.layer.3``)."""
    match = _LAYER_NUMBER.search(site)
    return int(match.group(1)) if match else None


# -- encoder-decoder models ---------------------------------------------------------------------

STACKS = ("encoder", "decoder")

#: Axes that index a decoder's positions in an encoder-decoder model carry this prefix
#: (``decoder_token``, ``decoder_query``, ``decoder_key``): the encoder's positions keep the
#: plain names, so cross-attention is (batch, head, decoder_query, key) and each of its
#: axes is labeled by its own tokens. The ``roles`` attribute holds the plain role.
DECODER_PREFIX = "decoder_"
_TOKEN_ROLES = ("token", "query", "key")


def stack_of(site: str) -> str | None:
    """``encoder`` or ``decoder`` where a dotted segment of ``site`` names the stack
    (``decoder.block.1``, ``model.encoder.layers.0``); None for models without stacks."""
    for segment in site.split("."):
        if segment.lower() in STACKS:
            return segment.lower()
    return None


def plain_role(axis: str) -> str:
    """The role of an axis a backend named: ``decoder_query`` plays ``query``."""
    rest = axis[len(DECODER_PREFIX):] if axis.startswith(DECODER_PREFIX) else ""
    return rest if rest in _TOKEN_ROLES else axis


def decoder_side(roles: tuple[str, ...]) -> tuple[str, ...]:
    """``roles`` of a tensor on the decoder's side of an encoder-decoder model: its token,
    query and key axes renamed to the decoder's (a cross-attention's key stays the
    encoder's: rename its query alone)."""
    return tuple(DECODER_PREFIX + r if r in _TOKEN_ROLES else r for r in roles)


def token_axis_of(dim: str) -> str | None:
    """The token axis whose labels (``<axis>_text``, ``<axis>_id``) label a stored dim:
    ``token`` for ``token``/``query``/``key`` (and their ``_<size>`` variants),
    ``decoder_token`` for the decoder's; None for other dims."""
    name = _SIZE_SUFFIX.sub("", dim)
    prefix = DECODER_PREFIX if name.startswith(DECODER_PREFIX) else ""
    return f"{prefix}token" if name[len(prefix):] in _TOKEN_ROLES else None


#: a dim no backend named (:func:`default_roles`), with the suffixes DimRegistry adds
_UNNAMED = re.compile(r"axis\d+(?:_\d+){0,2}")


def growable_axis(dim: str) -> bool:
    """Whether ``dim`` may take a new length in every pass (see :mod:`.growth`): a token
    axis, or an axis no backend named, whose meaning is unknown and may follow the tokens
    (e.g. attention weights returned in a tuple)."""
    return token_axis_of(dim) is not None or _UNNAMED.fullmatch(dim) is not None


class DimRegistry:
    """Keeps one size per dimension name so every variable fits in one xarray Dataset.

    A role that arrives with a second size (a 2-unit classifier beside 384-wide hidden states)
    is stored as ``<role>_<size>``; the plain role stays in the variable's ``roles`` attribute,
    so readers can still line dims up by role.
    """

    def __init__(self, known: dict[str, int] | None = None) -> None:
        self.sizes: dict[str, int] = dict(known or {})

    def resolve(self, roles: tuple[str, ...], shape: tuple[int, ...],
                lengths: dict[str, int] | None = None) -> tuple[str, ...]:
        """Dim names for a tensor of ``shape``. ``lengths``: the token axes' lengths in the
        current pass; given, a token axis takes the name whose length in this pass is its
        own (or that no tensor of the pass has used yet), whatever the stored length, which
        then grows or is filled (see :mod:`.growth`)."""
        if len(roles) != len(shape):
            raise CaptureError(f"dims {roles} do not match shape {shape}")
        names: list[str] = []
        for role, size in zip(roles, shape, strict=True):
            names.append(role if role == "batch" else
                         self._free_name(role, size, names, lengths))
        return tuple(names)

    def _free_name(self, role: str, size: int, taken: list[str],
                   lengths: dict[str, int] | None = None) -> str:
        # made one at a time: nearly every axis takes the first name (thousands of sites)
        candidates = chain((role, f"{role}_{size}"), (f"{role}_{size}_{i}" for i in range(2, 64)))
        for name in candidates:
            if name in taken:
                continue
            if lengths is not None and growable_axis(name):
                if (token_axis_of(name) is None and name not in lengths
                        and self.sizes.get(name, size) != size):
                    # an unnamed axis of another size than the stored one: the tensors that
                    # share the name may be unrelated to this one, so it takes a name of its
                    # own rather than setting their length for the pass
                    continue
                fits = lengths.setdefault(name, size) == size
            else:
                fits = self.sizes.get(name, size) == size
            if fits:
                self.sizes.setdefault(name, size)
                return name
        raise CaptureError(f"cannot name a {role!r} axis of size {size}: too many variants")


def default_roles(ndim: int) -> tuple[str, ...]:
    """Role names for a tensor nobody described: batch first, then positional axes."""
    if ndim == 0:
        raise CaptureError("a scalar has no batch axis; capture a tensor with a batch dimension")
    return ("batch",) + tuple(f"axis{i}" for i in range(1, ndim))


# -- roles shared by every backend and every reader ---------------------------------------------

#: the suffixes :class:`DimRegistry` adds to a role that arrives with a second size
_SIZE_SUFFIX = re.compile(r"(?:_\d+){1,2}$")


def roles_of(var: Any) -> tuple[str, ...]:
    """The role of each dim of a stored variable (a lazy ``xarray.DataArray`` or anything with
    ``dims`` and ``attrs``): its ``roles`` attribute, or, where that is missing or does not fit,
    its dim names without the size suffixes :class:`DimRegistry` adds (``hidden_2`` and
    ``hidden_2_3`` play ``hidden``; ``rnn_layer`` stays ``rnn_layer``)."""
    dims = tuple(str(d) for d in var.dims)
    roles = var.attrs.get("roles")
    if isinstance(roles, (list, tuple)) and len(roles) == len(dims):
        return tuple(plain_role(str(r)) for r in roles)
    return tuple(plain_role(_SIZE_SUFFIX.sub("", d)) for d in dims)


def hidden_size_of(model: Any) -> int | None:
    """The model's width where the model states it, else None: ``model.config.hidden_size``
    (Hugging Face), ``hidden_dim`` / ``hidden_size`` on the config or the model itself
    (keras-hub backbones). Backends call it once per ``attach`` and pass it to
    :func:`feature_role`."""
    config = getattr(model, "config", None)
    for owner in (config, model):
        if owner is None:
            continue
        for attr in ("hidden_size", "hidden_dim"):
            size = getattr(owner, attr, None)
            if isinstance(size, int) and not isinstance(size, bool):
                return size
    return None


def feature_role(size: int, hidden_size: int | None) -> str:
    """The role of a last (feature) axis of ``size``: ``hidden`` when it is the model width or
    the width is unknown, ``neuron`` (an MLP's inner layer) otherwise."""
    return "hidden" if hidden_size is None or size == hidden_size else "neuron"


def _transpose(value: Any, order: tuple[int, ...]) -> Any:
    return value.transpose(order)


def move_batch_first(value: Any, roles: tuple[str, ...],
                     permute: Callable[[Any, tuple[int, ...]], Any] = _transpose,
                     ) -> tuple[Any, tuple[str, ...]]:
    """``value`` and ``roles`` with the ``batch`` axis moved to the front (a time-major RNN's
    output), the other axes in their order; unchanged when batch is first or absent.

    ``permute(value, order)`` reorders the axes: ``value.transpose(order)`` by default (NumPy,
    JAX); PyTorch passes ``torch.permute``, TensorFlow ``tf.transpose``.
    """
    if "batch" not in roles or roles[0] == "batch":
        return value, roles
    axis = roles.index("batch")
    order = (axis, *(i for i in range(len(roles)) if i != axis))
    return permute(value, order), tuple(roles[i] for i in order)
