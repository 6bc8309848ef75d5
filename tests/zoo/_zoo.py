"""Shared checks for the model zoo: what every trace of a real model family must satisfy."""

from __future__ import annotations

from typing import Any

import numpy as np

from layerscope.core.naming import parse_variable_name, roles_of

IMAGE_ROLES = {"channel", "height", "width", "depth"}
ATTENTION_ROLES = ("batch", "head", "query", "key")


def captures(ds: Any) -> dict[str, Any]:
    """Captured variables of a trace by name (coordinates left out)."""
    return {str(name): ds[name] for name in ds.data_vars if "@" in str(name)}


def attention_variables(ds: Any) -> dict[str, Any]:
    return {name: var for name, var in captures(ds).items()
            if parse_variable_name(name).kind.startswith("attention")}


def assert_is_attention(var: Any, reference: Any, name: str) -> None:
    """``var`` holds ``reference`` (the framework's own probabilities), labeled and
    normalised as attention."""
    assert roles_of(var) == ATTENTION_ROLES, (name, roles_of(var))
    values = var.values
    np.testing.assert_allclose(values, np.asarray(reference), rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(values.sum(-1), 1.0, rtol=0, atol=1e-5, err_msg=name)


def assert_no_image_roles(ds: Any) -> None:
    """No variable of a model without convolutions is labeled channel/height/width."""
    wrong = {name: roles_of(var) for name, var in captures(ds).items()
             if IMAGE_ROLES & set(roles_of(var))}
    assert not wrong, wrong
