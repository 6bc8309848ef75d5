"""Vocabulary and label axes of PyTorch models: the last axis of the logits.

A language model's head maps ``hidden`` features onto the vocabulary, a classifier's onto its
labels. That axis is neither ``hidden`` nor an MLP's ``neuron``, and the format has no role for
it, so it gets a neutral name (``axis<i>``) instead of a wrong known one. Found from what the
model says, never from a size alone where the model says it:

- a Hugging Face model's output embeddings (``get_output_embeddings()``: ``lm_head``);
- a linear layer whose weight is an ``nn.Embedding``'s weight (tied input and output
  embeddings);
- in a model with no ``get_output_embeddings`` (a plain ``torch.nn`` language model), an
  ``nn.Linear`` mapping onto as many outputs as an ``nn.Embedding`` has rows (and not onto its
  width);
- a Hugging Face task model's linear layer onto ``config.num_labels`` outside its backbone
  (``base_model``): the classifier of ``...ForImageClassification``,
  ``...ForSequenceClassification``, ``...ForQuestionAnswering``;
- any output part named ``logits`` (``output.logits``, ``output.start_logits``).
"""

from __future__ import annotations

from torch import nn

from layerscope.core.naming import default_roles


def vocabulary_modules(model: nn.Module) -> frozenset[int]:
    """``id`` of each module of ``model`` whose output's last axis indexes the vocabulary."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    found: set[int] = set()
    own = getattr(model, "get_output_embeddings", None)
    if callable(own):
        try:
            head = own()
        except (AttributeError, NotImplementedError):  # heads that cannot say
            head = None
        if isinstance(head, nn.Module):
            found.add(id(head))
    tied = {id(e.weight) for e in embeddings}
    rows = {e.num_embeddings for e in embeddings if e.num_embeddings != e.embedding_dim}
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        if id(module.weight) in tied or (not callable(own) and module.out_features in rows):
            found.add(id(module))
    found.update(_label_heads(model))
    return frozenset(found)


def _label_heads(model: nn.Module) -> set[int]:
    base = getattr(model, "base_model", None)
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    if not isinstance(base, nn.Module) or base is model or not isinstance(labels, int):
        return set()
    backbone = {id(m) for m in base.modules()}
    return {id(m) for m in model.modules() if isinstance(m, nn.Linear)
            and id(m) not in backbone and m.out_features == labels}


def is_logits(kind: str) -> bool:
    """Whether ``kind`` is an output part named after logits (``output.logits``)."""
    base, _, part = kind.partition(".")
    return base == "output" and "logits" in part.split(".", 1)[0]


def with_vocabulary_last(roles: tuple[str, ...]) -> tuple[str, ...]:
    """``roles`` with the last (vocabulary) axis given its neutral name."""
    if len(roles) < 2 or roles[-1] == "batch":
        return roles
    return (*roles[:-1], default_roles(len(roles))[-1])
