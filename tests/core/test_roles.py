"""Role helpers shared by every backend and reader (layerscope.core.naming)."""

from types import SimpleNamespace

import numpy as np

from layerscope.core.naming import feature_role, hidden_size_of, move_batch_first, roles_of


def var(dims, roles=None):
    return SimpleNamespace(dims=dims, attrs={} if roles is None else {"roles": roles})


def test_roles_of_prefers_the_roles_attribute():
    assert roles_of(var(("batch", "hidden_2"), ["batch", "hidden"])) == ("batch", "hidden")


def test_roles_of_strips_only_the_suffixes_the_registry_adds():
    dims = ("batch", "hidden_2", "neuron_1536_2", "rnn_layer", "rnn_layer_3", "axis3")
    assert roles_of(var(dims)) == ("batch", "hidden", "neuron", "rnn_layer", "rnn_layer", "axis3")


def test_roles_of_ignores_a_roles_attribute_that_does_not_fit():
    assert roles_of(var(("batch", "token_9"), ["batch"])) == ("batch", "token")
    assert roles_of(var(("batch",), "batch")) == ("batch",)


def test_hidden_size_of_reads_configs_and_backbones():
    assert hidden_size_of(SimpleNamespace(config=SimpleNamespace(hidden_size=384))) == 384
    assert hidden_size_of(SimpleNamespace(hidden_dim=256)) == 256  # keras-hub backbones
    assert hidden_size_of(SimpleNamespace(config=SimpleNamespace(hidden_dim=64))) == 64
    assert hidden_size_of(SimpleNamespace(hidden_size=True)) is None  # a flag, not a width
    assert hidden_size_of(SimpleNamespace(config=None)) is None
    assert hidden_size_of(object()) is None


def test_feature_role():
    assert feature_role(384, 384) == "hidden"
    assert feature_role(1536, 384) == "neuron"
    assert feature_role(1536, None) == "hidden"


def test_move_batch_first():
    x = np.arange(24).reshape(2, 3, 4)  # (token, batch, hidden)
    moved, roles = move_batch_first(x, ("token", "batch", "hidden"))
    assert roles == ("batch", "token", "hidden")
    np.testing.assert_array_equal(moved, x.transpose(1, 0, 2))
    same, kept = move_batch_first(x, ("batch", "token", "hidden"))
    assert same is x and kept == ("batch", "token", "hidden")
    assert move_batch_first(x, ("axis0", "axis1", "axis2"))[0] is x
    swapped, _ = move_batch_first(x, ("token", "batch", "hidden"), lambda v, o: np.transpose(v, o))
    np.testing.assert_array_equal(swapped, x.transpose(1, 0, 2))
