"""Datasets for evaluation: Fashion-MNIST (the offline default) and ImageFolder with timm-style preprocessing.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (IDX files under
``/usr/share/datasets/fashion-mnist/``), so the default evaluation needs no internet and no ImageNet.

The reference model reads 28×28 images with 2×2 patches: a 14×14 grid, i.e. 196 patch tokens + CLS, the same
token count as a ViT-B/16 at 224. Upsampling to 224 with 16×16 patches would give the transformer exactly the
same work but cost 64× more pixels in the loader and the patch embedding, which matters on a 2-core CPU; so
the native resolution is the default, and ``img_size`` upsamples for models that want more pixels.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

PathLike = Union[str, os.PathLike]

#: Where Debian's dataset-fashion-mnist puts the IDX files; ``TOKENREDUCE_FMNIST`` overrides it.
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_INSTALL = "sudo apt-get install -y dataset-fashion-mnist"
#: Per-pixel statistics of the Fashion-MNIST training set (pixels scaled to [0, 1]).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")

_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
               0x0E: torch.float64}
_IDX_STRUCT = {0x08: "B", 0x09: "b", 0x0B: ">h", 0x0C: ">i", 0x0D: ">f", 0x0E: ">d"}


def read_idx(path: PathLike) -> torch.Tensor:
    """Read an IDX file (gzip-compressed or raw, whatever its name) into a tensor of its dtype and shape."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":  # the gzip magic number
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    count = 1
    for s in shape:
        count *= s
    dtype = _IDX_DTYPES[code]
    itemsize = torch.empty((), dtype=dtype).element_size()
    offset = 4 + 4 * ndim
    payload = data[offset:offset + count * itemsize]
    if len(payload) != count * itemsize:
        raise ValueError(f"{path} is truncated: expected {count} elements of shape {tuple(shape)}")
    if itemsize == 1:
        flat = torch.frombuffer(bytearray(payload), dtype=dtype)
    else:  # IDX is big-endian; torch.frombuffer reads native order, so byte-swap through struct
        flat = torch.tensor(struct.unpack(f">{count}{_IDX_STRUCT[code][-1]}", payload), dtype=dtype)
    return flat.reshape(shape)


def fashion_mnist_dir(root: Optional[PathLike] = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files; FileNotFoundError saying how to install it otherwise."""
    folder = Path(root or os.environ.get("TOKENREDUCE_FMNIST", FMNIST_DIR))
    if not any(_find_idx(folder, split)[0] for split in ("train", "t10k")):
        raise FileNotFoundError(
            f"Fashion-MNIST was not found in {folder}. Install it (offline, from Debian) with:\n"
            f"    {FMNIST_INSTALL}\n"
            "or point TOKENREDUCE_FMNIST (or --data) at a folder holding t10k-images-idx3-ubyte[.gz] and "
            "t10k-labels-idx1-ubyte[.gz].")
    return folder


def _find_idx(folder: Path, split: str) -> Tuple[Optional[Path], Optional[Path]]:
    """(images, labels) files of a split, gzip or raw, or None where missing."""
    def first(stem: str) -> Optional[Path]:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
        return None
    return first(f"{split}-images-idx3-ubyte"), first(f"{split}-labels-idx1-ubyte")


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files, as normalised float images ``[1, S, S]`` and int labels.

    Args:
        root: folder with the IDX files (default: Debian's location, or ``$TOKENREDUCE_FMNIST``).
        train: the 60 000 training images instead of the 10 000 test images.
        img_size: output side; 28 keeps the native pixels, larger values upsample bilinearly.
        channels: 1, or 3 to repeat the grey channel for models built for RGB.
        limit: keep only the first ``limit`` images (a quick subset; the test set is class-balanced throughout).

    ``images`` (uint8 ``[N, 28, 28]``) and ``labels`` (int64 ``[N]``) are public so a trainer can augment
    whole batches at once instead of image by image.
    """

    def __init__(self, root: Optional[PathLike] = None, train: bool = False, img_size: int = 28,
                 channels: int = 1, limit: Optional[int] = None) -> None:
        folder = fashion_mnist_dir(root)
        split = "train" if train else "t10k"
        images_path, labels_path = _find_idx(folder, split)
        if images_path is None or labels_path is None:
            raise FileNotFoundError(f"{folder} lacks the Fashion-MNIST '{split}' split; install it with: "
                                    f"{FMNIST_INSTALL}")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{folder}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.images, self.labels = images, labels.long()
        self.img_size, self.channels = int(img_size), channels
        self.classes = FMNIST_CLASSES

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.images[index:index + 1])[0], int(self.labels[index])

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 28, 28]`` -> normalised float ``[B, C, S, S]`` (used per item and by batch trainers)."""
        return normalize_fmnist(images, self.img_size, self.channels)


def normalize_fmnist(images: torch.Tensor, img_size: int = 28, channels: int = 1) -> torch.Tensor:
    """uint8 ``[B, H, W]`` or float ``[B, 1, H, W]`` in [0, 255] -> normalised float ``[B, C, S, S]``."""
    x = images.float().div_(255.0)
    if x.dim() == 3:
        x = x[:, None]
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x - FMNIST_MEAN) / FMNIST_STD
    return x.expand(-1, channels, -1, -1).contiguous() if channels != 1 else x


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder with timm's evaluation preprocessing
# ---------------------------------------------------------------------------------------------------------------
def eval_data_config(model: Optional[torch.nn.Module] = None, *, img_size: Optional[int] = None,
                     crop_pct: Optional[float] = None, interpolation: Optional[str] = None,
                     mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                     crop_mode: Optional[str] = None) -> Dict[str, Any]:
    """timm's data config for a model (input size, crop_pct, interpolation, mean, std), with overrides.

    The defaults come from the model's ``pretrained_cfg``, exactly as timm's validate.py resolves them, so a
    published number is evaluated with the preprocessing it was measured with.
    """
    from timm.data import resolve_data_config
    args: Dict[str, Any] = {}
    if img_size is not None:
        args["input_size"] = (3, int(img_size), int(img_size))
    if crop_pct is not None:
        args["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        args["interpolation"] = interpolation
    if mean is not None:
        args["mean"] = tuple(float(v) for v in mean)
    if std is not None:
        args["std"] = tuple(float(v) for v in std)
    if crop_mode is not None:
        args["crop_mode"] = crop_mode
    cfg = resolve_data_config(args, model=model)
    if img_size is not None:  # keep the model's channel count
        cfg["input_size"] = (cfg["input_size"][0], int(img_size), int(img_size))
    return cfg


def image_folder(root: PathLike, data_config: Dict[str, Any]) -> Dataset:
    """An ImageFolder (one sub-folder per class, e.g. the ImageNet val folder) with timm's eval transform:
    resize to ``img_size / crop_pct`` with the configured interpolation, centre crop, normalise."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; --data expects an ImageFolder layout "
                                "(one sub-folder of images per class, e.g. ImageNet's val/ sorted by synset)")
    transform = create_transform(
        input_size=data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode", "center"))
    return ImageFolder(str(root), transform=transform)


def describe_transform(data_config: Dict[str, Any]) -> str:
    """One line describing the preprocessing, for logs and results files."""
    c, h, w = data_config["input_size"]
    return (f"{h}x{w} crop_pct={data_config['crop_pct']} interpolation={data_config['interpolation']} "
            f"mean={tuple(round(v, 4) for v in data_config['mean'])} "
            f"std={tuple(round(v, 4) for v in data_config['std'])}")


def subset_indices(n: int, limit: Optional[int]) -> Sequence[int]:
    """The first ``limit`` indices (all when None): a deterministic subset every rank agrees on."""
    return range(n if limit is None else min(n, int(limit)))


__all__ = ["FMNIST_CLASSES", "FMNIST_DIR", "FMNIST_INSTALL", "FMNIST_MEAN", "FMNIST_STD", "FashionMNIST",
           "describe_transform", "eval_data_config", "fashion_mnist_dir", "image_folder", "normalize_fmnist",
           "read_idx", "subset_indices"]

