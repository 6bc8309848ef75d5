"""``layerscope render`` from the command line: files written, errors as one line, exit 2."""

from __future__ import annotations

import numpy as np
import pytest

from layerscope.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["attention", "--layer", "2", "--head", "3", "-o", "a.png"],
        ["attention", "--variable", "encoder.layer.1.attention.self@attention", "-o", "a.svg"],
        ["attention", "--view", "grid", "-o", "g.pdf"],
        ["attention", "--view", "heads", "--layer", "1", "--head", "0", "1", "-o", "h.png"],
        ["attention", "--view", "summary", "-o", "s.png"],
        ["attention", "--window", "1", "5", "-o", "w.png"],
        ["hidden", "-o", "n.png"],
        ["hidden", "--view", "trajectory", "--sample", "1", "-o", "t.svg"],
        ["hidden", "--view", "similarity", "--similarity", "cosine", "-o", "c.png"],
        ["activations", "--layer", "1", "-o", "n.png"],
        ["activations", "--view", "top-tokens", "--layer", "3", "--top-k", "3", "-o", "t.png"],
        ["stats", "-o", "s.pdf"],
        ["stats", "--variable", "encoder.layer.0@output", "pooler@output", "-o", "s.svg"],
    ],
)
def test_render_writes_and_prints_the_path(minilm_trace, tmp_path, capsys, argv):
    out = tmp_path / argv[-1]
    argv = ["render", argv[0], str(minilm_trace), *argv[1:-1], str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.stat().st_size > 1000


def test_render_logit_lens(minilm_trace, minilm, tmp_path, capsys):
    model, tokenizer = minilm
    matrix = model.embeddings.word_embeddings.weight.detach().numpy()
    np.save(tmp_path / "w.npy", matrix)
    vocab = tokenizer.convert_ids_to_tokens(list(range(matrix.shape[0])))
    (tmp_path / "v.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    out = tmp_path / "lens.png"
    assert main(["render", "hidden", str(minilm_trace), "--view", "logit-lens",
                 "--unembedding", str(tmp_path / "w.npy"), "--vocab", str(tmp_path / "v.txt"),
                 "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["attention", "{trace}", "--variable", "x@attention"], "no variable 'x@attention'"),
        (["attention", "{trace}", "--head", "99"], "head 99 is out of range"),
        (["attention", "{missing}"], "no trace at"),
        (["hidden", "{trace}", "--view", "logit-lens"], "--unembedding"),
        (["hidden", "{trace}", "--sample", "9"], "sample 9 is out of range"),
        (["activations", "{trace}", "--view", "channels"], "no convolution output"),
        (["stats", "{trace}", "--variable", "nope@output"], "no variable 'nope@output'"),
    ],
)
def test_render_errors(minilm_trace, tmp_path, capsys, argv, message):
    values = {"trace": str(minilm_trace), "missing": str(tmp_path / "none.zarr")}
    argv = ["render", *[a.format(**values) for a in argv], "-o", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_render_refuses_unknown_suffix(minilm_trace, tmp_path, capsys):
    assert main(["render", "hidden", str(minilm_trace), "-o", str(tmp_path / "x.gif")]) == 2
    assert ".png, .svg or .pdf" in capsys.readouterr().err
