"""Image files for vision models (``layerscope trace FOLDER --image a.png``): checked before a
store is created, then turned into ``pixel_values`` batches by the folder's image processor,
or, for a folder without one, resized and normalized as documented below."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.core import LayerscopeError

IMAGE_FORMATS = ("PNG", "JPEG")
#: without a preprocessor_config.json: resized to the config's ``image_size`` (this when it
#: names none), scaled to 0..1 and normalized with the ImageNet mean and standard deviation,
#: the statistics most vision checkpoints were trained with
DEFAULT_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_image_files(paths: Sequence[str]) -> list[Path]:
    """Each path is a readable PNG or JPEG file (its header is read, not its pixels)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pillow comes with matplotlib; a stripped install may lack it
        raise LayerscopeError("--image needs pillow: pip install pillow") from exc
    checked = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise LayerscopeError(f"--image {path}: no such file")
        try:
            with Image.open(path) as image:
                image_format = image.format
        except (UnidentifiedImageError, OSError) as exc:
            raise LayerscopeError(f"--image {path}: not an image PIL can read ({exc})") from exc
        if image_format not in IMAGE_FORMATS:
            raise LayerscopeError(
                f"--image {path} is {image_format}; give PNG or JPEG files"
            )
        checked.append(path)
    return checked


def load_image_processor(folder: Path) -> Any:
    """The folder's image processor (``preprocessor_config.json``), else None."""
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor
    from transformers.utils import logging

    # without torchvision, transformers 5 says on stderr that it uses its PIL processor; that
    # is the processor meant here, so the notice is noise
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoImageProcessor.from_pretrained(str(folder))
    finally:
        logging.set_verbosity(verbosity)


def pixel_batches(paths: Sequence[Path], config: Any, processor: Any,
                  batch_size: int) -> list[dict[str, np.ndarray]]:
    """``{"pixel_values": (batch, channel, height, width)}`` per ``batch_size`` images."""
    batches = []
    for start in range(0, len(paths), batch_size):
        images = [_read(path, _channels(config)) for path in paths[start:start + batch_size]]
        if processor is not None:
            pixels = np.asarray(processor(images=images, return_tensors="np")["pixel_values"])
        else:
            pixels = np.stack([_resize_normalize(image, _size(config)) for image in images])
        batches.append({"pixel_values": pixels.astype(np.float32)})
    return batches


def _read(path: Path, channels: int) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("L" if channels == 1 else "RGB")


def _channels(config: Any) -> int:
    return int(getattr(config, "num_channels", 3) or 3)


def _size(config: Any) -> tuple[int, int]:
    """(height, width) from the config's ``image_size`` (an int or a pair), else 224."""
    size = getattr(config, "image_size", None)
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE


def _resize_normalize(image: Any, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    height, width = size
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    values = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    if values.ndim == 2:  # one channel: normalized with the mean of the three statistics
        return ((values - mean.mean()) / std.mean())[None]
    return ((values - mean) / std).transpose(2, 0, 1)
