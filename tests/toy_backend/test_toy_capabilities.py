"""Capability flags: a kit that declares what its backend lacks gets those tests skipped, with
the flag named, and the rest of the suite runs as before."""

import pytest

from layerscope.testing import ConformanceSuite

from .kit_toy import ToyKit


class LimitedKit(ToyKit):
    kinds = ("mlp", "rnn")
    attention = False
    keyboard_interrupt = False
    numpy_inputs = False


class LimitedSuite(ConformanceSuite):  # not collected: called by hand below
    kit = LimitedKit()


def test_missing_kinds_are_skipped_by_name(tmp_path):
    with pytest.raises(pytest.skip.Exception, match=r"no cnn model \(Kit.kinds\)"):
        LimitedSuite().test_outputs_equal_framework_values("cnn", tmp_path)
    LimitedSuite().test_outputs_equal_framework_values("rnn", tmp_path)  # runs


def test_missing_attention_is_skipped(tmp_path):
    class WithTransformer(LimitedKit):
        kinds = ("transformer",)

    class Suite(ConformanceSuite):
        kit = WithTransformer()

    with pytest.raises(pytest.skip.Exception, match=r"Kit.attention"):
        Suite().test_attention_probabilities(tmp_path)
    Suite().test_sites_list_every_case_site("transformer")  # does not ask for the flag


def test_keyboard_interrupt_and_numpy_inputs_are_skipped(tmp_path):
    with pytest.raises(pytest.skip.Exception, match=r"Kit.keyboard_interrupt"):
        LimitedSuite().test_hooks_removed_after_failure("mlp", KeyboardInterrupt(), tmp_path)
    LimitedSuite().test_hooks_removed_after_failure("mlp", RuntimeError("boom"), tmp_path)
    with pytest.raises(pytest.skip.Exception, match=r"Kit.numpy_inputs"):
        LimitedSuite().test_capture_runs_numpy_inputs(tmp_path)


def test_tests_on_some_model_use_a_kind_the_kit_has(tmp_path):
    class RnnOnly(LimitedKit):
        kinds = ("rnn",)

    class Suite(ConformanceSuite):
        kit = RnnOnly()

    Suite().test_append_mode_adds_batches(tmp_path)
    Suite().test_glob_selection(tmp_path)
