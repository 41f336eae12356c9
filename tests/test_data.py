"""The Fashion-MNIST IDX loader (on small generated files) and the ImageFolder preprocessing helpers."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from tokenreduce.evaluation.datasets import (FMNIST_MEAN, FMNIST_STD, FashionMNIST, eval_data_config, fashion_mnist_dir,
                              image_folder, read_idx)


def write_idx(path: Path, tensor: torch.Tensor, code: int = 0x08, compress: bool = False) -> None:
    """Write ``tensor`` as an IDX file (big-endian header and payload), gzip-compressed when asked."""
    fmt = {0x08: "B", 0x0C: ">i"}[code]
    header = bytes([0, 0, code, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    values = tensor.flatten().tolist()
    payload = bytes(values) if code == 0x08 else struct.pack(f">{len(values)}i", *values)
    data = header + payload
    assert fmt
    path.write_bytes(gzip.compress(data) if compress else data)


def make_fmnist(folder: Path, n: int = 6, compress: bool = True, seed: int = 0):
    """A tiny Fashion-MNIST folder (test and train splits); returns (images, labels)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n, dtype=torch.uint8) % 10
    suffix = ".gz" if compress else ""
    for split in ("t10k", "train"):
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_uint8_and_int32(tmp_path, compress):
    x = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    write_idx(tmp_path / "a", x, compress=compress)
    assert torch.equal(read_idx(tmp_path / "a"), x)
    y = torch.tensor([[1, -2, 70000], [3, 4, -5]], dtype=torch.int32)
    write_idx(tmp_path / "b", y, code=0x0C)
    assert torch.equal(read_idx(tmp_path / "b"), y)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", torch.zeros(10, dtype=torch.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_items(tmp_path, compress):
    images, labels = make_fmnist(tmp_path, compress=compress)
    ds = FashionMNIST(tmp_path)
    assert len(ds) == 6
    x, y = ds[2]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 2
    expected = (images[2].float() / 255 - FMNIST_MEAN) / FMNIST_STD
    torch.testing.assert_close(x[0], expected)
    assert torch.equal(ds.labels, labels.long())


def test_fashion_mnist_options(tmp_path):
    make_fmnist(tmp_path)
    ds = FashionMNIST(tmp_path, train=True, img_size=56, channels=3, limit=4)
    assert len(ds) == 4
    x, _ = ds[0]
    assert x.shape == (3, 56, 56)
    assert torch.equal(x[0], x[2])
    with pytest.raises(ValueError, match="channels"):
        FashionMNIST(tmp_path, channels=2)


def test_missing_dataset_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENREDUCE_FMNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")
    monkeypatch.setenv("TOKENREDUCE_FMNIST", str(tmp_path))
    make_fmnist(tmp_path)
    assert fashion_mnist_dir() == tmp_path


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    """A small ImageFolder of random RGB PNGs (``per_class`` images in each of ``classes`` folders)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = torch.randint(0, 256, (size, size + 8, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_image_folder_uses_the_model_pretrained_cfg(tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    model.pretrained_cfg = dict(input_size=(3, 32, 32), crop_pct=0.875, interpolation="bicubic",
                                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    cfg = eval_data_config(model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    cfg2 = eval_data_config(model, img_size=24, crop_pct=1.0, interpolation="bilinear")
    assert cfg2["input_size"] == (3, 24, 24) and cfg2["crop_pct"] == 1.0 and cfg2["interpolation"] == "bilinear"
    ds = image_folder(make_image_folder(tmp_path / "folder"), cfg2)
    assert len(ds) == 12 and ds.classes == ["class_0", "class_1", "class_2"]
    x, y = ds[5]
    assert x.shape == (3, 24, 24) and y == 1
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        image_folder(tmp_path / "missing", cfg)
