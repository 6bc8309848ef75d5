"""The toy backend is found the way every third-party backend is: through its entry point."""

from importlib.metadata import entry_points

import numpy as np
import toynn

import layerscope
from layerscope.backends import GROUP, Backend, available, detect, get_backend


def test_registered_through_the_entry_point():
    points = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    assert points.get("numpy") == "layerscope_toynn:BACKEND"
    assert "numpy" in available()
    assert available()[:3] == ["torch", "tensorflow", "jax"]  # built-ins first


def test_detect_picks_it_for_a_toy_model():
    model = toynn.Sequential(toynn.Linear(2, 3, np.random.default_rng(0)))
    backend = detect(model)
    assert backend.name == "numpy"
    assert backend is get_backend("numpy")
    assert isinstance(backend, Backend)


def test_it_claims_no_other_object():
    backend = get_backend("numpy")
    assert not backend.can_handle(np.zeros(3))
    assert not backend.can_handle(lambda x: x)
    assert not backend.can_handle(toynn.Module)  # the class, not a model


def test_capture_by_name(tmp_path):
    model = toynn.Sequential(toynn.Linear(2, 3, np.random.default_rng(0)), toynn.ReLU())
    x = np.ones((4, 2), np.float32)
    ds = layerscope.capture(model, x, tmp_path / "t.zarr", backend="numpy")
    assert ds.attrs["framework"] == "numpy"
    np.testing.assert_array_equal(ds["root@output"].values, model(x))
