import os

import pytest

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
