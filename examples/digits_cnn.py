"""A small CNN trained in seconds on scikit-learn's digits, traced, and its channel maps drawn.

    python examples/digits_cnn.py --out digits_out

writes ``digits_out/trace.zarr`` (the convolutions' inputs and outputs for 64 test images) and
``digits_out/channels.png`` (the channel maps of the first convolution over one image), and
prints the test accuracy. Everything runs on the CPU; the data ships with scikit-learn.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np


def build_model() -> Any:
    from torch import nn

    torch_layers = OrderedDict([
        ("conv1", nn.Conv2d(1, 8, kernel_size=3, padding=1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 16, kernel_size=3, padding=1)),
        ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(16 * 4 * 4, 10)),
    ])
    return nn.Sequential(torch_layers)


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images scaled to [0, 1] as (N, 1, 8, 8) float32, split 80 / 20 with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(images, digits.target, test_size=0.2, random_state=0)


def train(model: Any, images: np.ndarray, labels: np.ndarray, epochs: int = 8) -> None:
    import torch

    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels).long()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    model.eval()


def accuracy(model: Any, images: np.ndarray, labels: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(dim=1).numpy()
    return float((predicted == labels).mean())


def main(out: str | Path = "digits_out", epochs: int = 8, sample: int = 0) -> dict[str, Any]:
    import torch

    import layerscope
    from layerscope.renderers import channel_grid, save

    torch.manual_seed(0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, x_test, y_train, y_test = load_digits()
    model = build_model()
    train(model, x_train, y_train, epochs)
    score = accuracy(model, x_test, y_test)
    trace = out / "trace.zarr"
    with torch.no_grad():
        layerscope.capture(model, torch.from_numpy(x_test[:64]), trace, mode="w",
                           capture=["conv1", "relu1", "conv2", "relu2"],
                           kinds=["input", "output"])
    ds = layerscope.open_trace(trace)
    picture = save(channel_grid(ds, "relu1@output", sample=sample), out / "channels.png")
    print(f"test accuracy {score:.3f}; digit {int(y_test[sample])}: {picture}")
    return {"accuracy": score, "trace": trace, "picture": picture, "label": int(y_test[sample])}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits_out")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sample", type=int, default=0)
    args = parser.parse_args()
    main(args.out, args.epochs, args.sample)
