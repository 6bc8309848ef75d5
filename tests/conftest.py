import os
import sys
from pathlib import Path

import pytest

# `python -m pytest` puts the working directory on sys.path; from the repository root that makes
# core/, backends/ and renderers/ importable a second time as top-level packages (their classes
# then differ from layerscope's own). Tests reach them only as layerscope.*: drop the root.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXTS = [
    "The cat sat on the mat.",
    "Zarr stores chunked, compressed arrays.",
    "Attention is all you need.",
    "Hello world",
    "Layer by layer, the network refines what it knows.",
    "Short.",
]


@pytest.fixture(scope="session")
def minilm_folder():
    from layerscope.loading import minilm_folder

    return minilm_folder()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_folder))


def load_minilm(folder, attn_implementation):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), attn_implementation=attn_implementation).eval()
