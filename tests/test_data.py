"""Tests for fedtune.data: the embedded sets, the loaders on local files, and partitioning."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedtune.data import (
    DataConfig,
    DataSplit,
    ImageSet,
    load_data,
    make_shapes,
    partition_indices,
)
from fedtune.errors import ConfigError
from fedtune.typedconfig import from_dict


@pytest.fixture(scope="module")
def digits() -> DataSplit:
    return load_data(DataConfig())


@pytest.fixture(scope="module")
def shapes() -> DataSplit:
    return load_data(DataConfig(name="shapes", num_samples=400))


# --- digits -----------------------------------------------------------------------------------


def test_digits_shapes_ranges_and_normalization(digits: DataSplit) -> None:
    assert digits.name == "digits"
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == 360  # ceil(0.2 * 1797)
    for part in (digits.train, digits.test):
        assert part.images.dtype == torch.float32
        assert part.images.shape[1:] == (3, 32, 32)
        assert part.tasks == ["digit", "parity", "magnitude"]
        assert part.num_classes == {"digit": 10, "parity": 2, "magnitude": 2}
        assert all(y.dtype == torch.int64 for y in part.labels.values())
    x = digits.train.images
    # background 0 -> -1, full ink 16 -> close to +1; grey repeated to 3 channels
    assert x.min().item() == -1.0 and 0.9 < x.max().item() <= 1.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_digits_labels_consistent(digits: DataSplit) -> None:
    for part in (digits.train, digits.test):
        d = part.labels["digit"]
        assert torch.equal(part.labels["parity"], d % 2)
        assert torch.equal(part.labels["magnitude"], (d >= 5).long())
        assert set(d.tolist()) == set(range(10))


def test_digits_split_is_stratified(digits: DataSplit) -> None:
    train = np.bincount(digits.train.labels["digit"].numpy(), minlength=10)
    test = np.bincount(digits.test.labels["digit"].numpy(), minlength=10)
    share = test / (train + test)
    assert np.all(np.abs(share - 0.2) < 0.02)


def test_digits_deterministic_and_seeded(digits: DataSplit) -> None:
    again = load_data(DataConfig())
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.test.labels["digit"], digits.test.labels["digit"])
    other = load_data(DataConfig(seed=1))
    assert not torch.equal(other.test.images, digits.test.images)


def test_digits_size_channels_tasks_and_caps() -> None:
    split = load_data(
        DataConfig(img_size=16, channels=1, tasks=["parity", "digit"], max_train=50, max_test=20)
    )
    assert split.train.images.shape == (50, 1, 16, 16)
    assert split.test.images.shape == (20, 1, 16, 16)
    assert split.train.tasks == ["parity", "digit"]
    assert split.train.num_classes == {"parity": 2, "digit": 10}
    again = load_data(
        DataConfig(img_size=16, channels=1, tasks=["parity", "digit"], max_train=50, max_test=20)
    )
    assert torch.equal(again.train.images, split.train.images)


def test_unknown_task_names_it_and_lists_available() -> None:
    with pytest.raises(ConfigError, match=r"no task 'colour'.*digit, parity, magnitude"):
        load_data(DataConfig(tasks=["digit", "colour"]))


# --- shapes -----------------------------------------------------------------------------------


def test_shapes_sizes_labels_and_determinism(shapes: DataSplit) -> None:
    assert len(shapes.train) == 320 and len(shapes.test) == 80
    assert shapes.train.tasks == ["shape", "colour", "count"]
    assert shapes.train.num_classes == {"shape": 4, "colour": 6, "count": 4}
    for task, k in shapes.train.num_classes.items():
        y = torch.cat([shapes.train.labels[task], shapes.test.labels[task]])
        assert set(y.tolist()) == set(range(k))
    x = shapes.train.images
    assert x.shape[1:] == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    again = load_data(DataConfig(name="shapes", num_samples=400))
    assert torch.equal(again.train.images, x)
    assert torch.equal(again.test.labels["count"], shapes.test.labels["count"])


def test_shapes_seed_offset_gives_other_images(shapes: DataSplit) -> None:
    other = load_data(DataConfig(name="shapes", num_samples=400, shapes_seed_offset=1))
    assert not torch.equal(other.train.images, shapes.train.images)
    # no image of the offset set appears in the original set
    a = shapes.train.images.flatten(1)
    b = other.train.images.flatten(1)
    assert torch.cdist(a[:50], b).min() > 1.0


def test_shapes_count_brightness_and_colour() -> None:
    split = load_data(DataConfig(name="shapes", num_samples=800, test_fraction=0.5))
    x, count = split.train.images, split.train.labels["count"]
    brightness = [x[count == c].mean().item() for c in range(4)]
    assert brightness == sorted(brightness) and brightness[3] - brightness[0] > 0.1
    # the brightest channel of red objects is red, of blue objects blue
    colour = split.train.labels["colour"]
    for c, channel in ((0, 0), (1, 1), (2, 2)):
        per_channel = x[colour == c].amax(dim=(2, 3)).mean(0)
        assert per_channel.argmax().item() == channel


def test_make_shapes_count_is_exact() -> None:
    from scipy import ndimage

    images, labels = make_shapes(60, 32, seed=3)
    for image, count in zip(images, labels["count"], strict=True):
        mask = image.max(axis=2) > 128
        assert ndimage.label(mask)[1] == count + 1


def test_shapes_grey() -> None:
    split = load_data(DataConfig(name="shapes", channels=1))
    assert split.train.images.shape == (1600, 1, 32, 32)


# --- ImageSet ---------------------------------------------------------------------------------


def _small_set(n: int = 10) -> ImageSet:
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone()
    labels = {"a": torch.arange(n) % 3, "b": torch.arange(n)}
    return ImageSet(images, labels, {"a": 3, "b": n})


def test_loader_batches_and_last_partial_batch() -> None:
    s = _small_set(10)
    loader = s.loader(batch_size=4, shuffle=False)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.shape == (4, 3, 4, 4) and y.dtype == torch.int64
    assert torch.equal(torch.cat([y for _, y in batches]), s.labels["a"])
    ys = torch.cat([y for _, y in s.loader(4, shuffle=False, task="b")])
    assert torch.equal(ys, torch.arange(10))


def test_loader_shuffle_seeded_and_epoch_dependent() -> None:
    s = _small_set(50)

    def epochs(seed: int) -> list[torch.Tensor]:
        loader = s.loader(8, shuffle=True, seed=seed, task="b")
        return [torch.cat([y for _, y in loader]) for _ in range(2)]

    first, second = epochs(0)
    assert sorted(first.tolist()) == list(range(50))  # every sample once per epoch
    assert not torch.equal(first, second)  # a fresh order each epoch
    again = epochs(0)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)
    assert not torch.equal(epochs(1)[0], first)
    # images travel with their labels
    for x, y in s.loader(8, shuffle=True, task="b"):
        assert torch.equal(x[:, 0, 0, 0].long(), y)


def test_loader_bad_inputs() -> None:
    s = _small_set()
    with pytest.raises(ConfigError, match="no task 'c'.*a, b"):
        s.loader(4, shuffle=False, task="c")
    with pytest.raises(ConfigError, match="batch_size"):
        s.loader(0, shuffle=False)


@pytest.mark.parametrize(
    "index", [[3, 1, 7], np.array([3, 1, 7]), torch.tensor([3, 1, 7]), (3, 1, 7)]
)
def test_subset(index) -> None:
    s = _small_set()
    sub = s.subset(index)
    assert len(sub) == 3 and sub.tasks == ["a", "b"] and sub.num_classes == s.num_classes
    assert torch.equal(sub.labels["b"], torch.tensor([3, 1, 7]))
    assert torch.equal(sub.images[:, 0, 0, 0], torch.tensor([3.0, 1.0, 7.0]))
    assert len(s.subset([])) == 0


# --- imagefolder ------------------------------------------------------------------------------

_RGB = {"blue": (0, 0, 255), "red": (255, 0, 0)}


def _write_folder(folder: Path, per_class: int, size: int = 10) -> None:
    for name, rgb in _RGB.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size + i, size), rgb).save(folder / name / f"{i}.png")


def test_imagefolder_train_test(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", 3)
    _write_folder(tmp_path / "test", 2)
    split = load_data(DataConfig(name="imagefolder", root=str(tmp_path), img_size=8))
    assert len(split.train) == 6 and len(split.test) == 4
    assert split.train.images.shape == (6, 3, 8, 8)
    assert split.train.num_classes == {"label": 2}
    assert split.train.class_names == {"label": ["blue", "red"]}
    # class 0 is blue: channel 2 at +1, channel 0 at -1
    blue = split.test.images[split.test.labels["label"] == 0]
    assert torch.allclose(blue[:, 2], torch.ones(1)) and torch.allclose(blue[:, 0], -torch.ones(1))


def test_imagefolder_single_folder_is_split(tmp_path: Path) -> None:
    _write_folder(tmp_path, 5)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), test_fraction=0.4, channels=1)
    split = load_data(cfg)
    assert len(split.train) == 6 and len(split.test) == 4
    assert split.train.images.shape[1] == 1
    assert sorted(split.test.labels["label"].tolist()) == [0, 0, 1, 1]  # stratified


def test_imagefolder_16_bit_and_float_images_are_rescaled_not_clipped(tmp_path: Path) -> None:
    """PIL's convert("L") clips a 16-bit or float image: a ramp 0..60000 would come out all
    white, a float image in 0..1 all black."""
    ramp = np.linspace(0, 60000, 64, dtype=np.uint16).reshape(8, 8)
    for cls, image in (("a", Image.fromarray(ramp)), ("b", Image.fromarray((ramp / 65535.0).astype(np.float32), mode="F"))):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "test" / cls).mkdir(parents=True)
        for part in ("train", "test"):
            image.save(tmp_path / part / cls / ("0.png" if cls == "a" else "0.tiff"))
    split = load_data(DataConfig(name="imagefolder", root=str(tmp_path), img_size=8, channels=1))
    want = torch.from_numpy(ramp / 65535.0).float() * 2 - 1
    for i in range(2):
        torch.testing.assert_close(split.train.images[i, 0], want, atol=1e-4, rtol=0)


def test_pixel_scale_is_decided_once_per_set_not_per_image_size() -> None:
    from fedtune.data.core import _stack_images

    small, large = np.full((4, 4), 200, dtype=np.int64), np.full((6, 6), 1000, dtype=np.int64)
    out = _stack_images([small, large], channels=1, size=4)
    # both on the 16-bit scale the set's brightest pixel calls for
    assert torch.allclose(out[0], torch.tensor(200 / 65535 * 2 - 1)) and torch.allclose(out[1], torch.tensor(1000 / 65535 * 2 - 1))


def test_train_and_test_images_are_scaled_alike(tmp_path: Path) -> None:
    """Float images whose train set peaks at 3.0 (a 0..255 scale) and whose few test images
    peak at 0.9: the test images take the train set's scale, not one of their own (which
    would make them up to 255 times brighter than what the model trained on)."""
    rng = np.random.default_rng(0)
    for part, peak in (("train", 3.0), ("test", 0.9)):
        for cls in ("a", "b"):
            (tmp_path / part / cls).mkdir(parents=True)
            pixels = (rng.random((8, 8)) * peak).astype(np.float32)
            pixels[0, 0] = peak
            Image.fromarray(pixels, mode="F").save(tmp_path / part / cls / "0.tiff")
    split = load_data(DataConfig(name="imagefolder", root=str(tmp_path), img_size=8, channels=1))
    assert float(split.train.images.max()) == pytest.approx(3.0 / 255 * 2 - 1, abs=1e-4)
    assert float(split.test.images.max()) == pytest.approx(0.9 / 255 * 2 - 1, abs=1e-4)


def test_imagefolder_truncated_image_is_an_error_naming_the_file(tmp_path: Path) -> None:
    _write_folder(tmp_path, 3)
    bad = tmp_path / "red" / "1.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:2000])  # cut short: the header reads, the pixels do not
    with pytest.raises(ConfigError, match="cannot read image .*red/1.png"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path), test_fraction=0.4))


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.root: data set 'imagefolder' needs data.root"):
        load_data(DataConfig(name="imagefolder"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.root: .*class folder"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path / "empty")))


# --- Hugging Face -----------------------------------------------------------------------------


def _hf_set(n: int):
    import datasets

    features = datasets.Features(
        {
            "img": datasets.Image(),
            "label": datasets.ClassLabel(names=["dark", "bright"]),
            "kind": datasets.Value("string"),
        }
    )
    rows = {
        "img": [Image.new("L", (6, 6), 255 * (i % 2)) for i in range(n)],
        "label": [i % 2 for i in range(n)],
        "kind": ["x" if i % 3 else "y" for i in range(n)],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def test_hf_save_to_disk_with_splits(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "hfset"
    datasets.DatasetDict({"train": _hf_set(12), "test": _hf_set(6)}).save_to_disk(str(path))
    cfg = DataConfig(
        name=f"hf:{path}", hf_image_key="img", hf_label_keys=["label", "kind"], img_size=8
    )
    split = load_data(cfg)
    assert len(split.train) == 12 and len(split.test) == 6
    assert split.train.images.shape == (12, 3, 8, 8)
    assert split.train.num_classes == {"label": 2, "kind": 2}
    assert split.train.class_names["kind"] == ["x", "y"]
    y = split.train.labels["label"]
    assert torch.equal(y, torch.arange(12) % 2)
    # bright images (label 1) are +1, dark ones -1
    assert torch.all(split.train.images[y == 1] == 1) and torch.all(
        split.train.images[y == 0] == -1
    )
    assert torch.equal(
        split.train.labels["kind"], torch.tensor([1 if i % 3 == 0 else 0 for i in range(12)])
    )


def test_hf_single_dataset_is_split(tmp_path: Path) -> None:
    path = tmp_path / "one"
    _hf_set(20).save_to_disk(str(path))
    split = load_data(DataConfig(name=f"hf:{path}", hf_image_key="img", tasks=["label"]))
    assert len(split.train) == 16 and len(split.test) == 4
    assert split.train.tasks == ["label"]


def test_hf_held_out_split_is_the_same_whatever_the_label_keys(tmp_path: Path) -> None:
    """Two tasks reading one train-only set with other label columns must get the same test
    images (one task's test images would otherwise be the other's training images)."""
    path = tmp_path / "one"
    _hf_set(20).save_to_disk(str(path))
    by_label = load_data(DataConfig(name=f"hf:{path}", hf_image_key="img", hf_label_keys=["label"], hf_test_split=None))
    by_kind = load_data(DataConfig(name=f"hf:{path}", hf_image_key="img", hf_label_keys=["kind", "label"], hf_test_split=None))
    assert torch.equal(by_label.test.images, by_kind.test.images)
    assert torch.equal(by_label.test.labels["label"], by_kind.test.labels["label"])


def test_hf_parquet_folder_through_load_dataset(tmp_path: Path, monkeypatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "pq" / "data"
    folder.mkdir(parents=True)
    _hf_set(10).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    split = load_data(DataConfig(name=f"hf:{tmp_path / 'pq'}", hf_image_key="img", max_train=5))
    assert len(split.train) == 5 and len(split.test) == 2  # no test split: 20% of 10
    assert split.train.num_classes == {"label": 2}


def test_hf_errors(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "hfset"
    _hf_set(10).save_to_disk(str(path))
    with pytest.raises(ConfigError, match="hf_label_keys: no column 'digit'.*img, label, kind"):
        load_data(DataConfig(name=f"hf:{path}", hf_image_key="img", hf_label_keys=["digit"]))
    with pytest.raises(ConfigError, match="hf_image_key: no column 'image'"):
        load_data(DataConfig(name=f"hf:{path}"))
    dict_path = tmp_path / "hfdict"
    datasets.DatasetDict({"train": _hf_set(4)}).save_to_disk(str(dict_path))
    with pytest.raises(ConfigError, match="hf_train_split: no split 'fit'.*it has: train"):
        load_data(DataConfig(name=f"hf:{dict_path}", hf_image_key="img", hf_train_split="fit"))
    with pytest.raises(ConfigError, match="cannot load Hugging Face data set"):
        load_data(DataConfig(name=f"hf:{tmp_path / 'missing'}"))
    # a test split that is not there (misspelt) is named, not replaced by part of train
    with pytest.raises(ConfigError, match="hf_test_split: no split 'validation'.*it has: train"):
        load_data(DataConfig(name=f"hf:{dict_path}", hf_image_key="img", hf_test_split="validation"))
    # a column the test split lacks is named with the test split's columns
    both = tmp_path / "hfboth"
    datasets.DatasetDict({"train": _hf_set(4), "test": _hf_set(4).remove_columns("kind")}).save_to_disk(str(both))
    with pytest.raises(ConfigError, match="no column 'kind' in split 'test'.*its columns: img, label$"):
        load_data(DataConfig(name=f"hf:{both}", hf_image_key="img", hf_label_keys=["label", "kind"]))
    # hidden labels (a ClassLabel of -1, as benchmarks' test splits have) are refused, not dropped
    hidden = tmp_path / "hfhidden"
    datasets.DatasetDict({"train": _hf_set(4), "test": _hf_set(3).map(lambda r: {"label": -1})}).save_to_disk(str(hidden))
    with pytest.raises(ConfigError, match="the test split has 3 label\\(s\\) of -1"):
        load_data(DataConfig(name=f"hf:{hidden}", hf_image_key="img"))
    # a plain integer or string column: -1 and None are unlabelled examples, not classes
    for value, shown in ((-1, "-1"), (None, "None")):
        plain = tmp_path / f"hfplain{shown}"
        rows = _hf_set(6).to_dict()
        rows["num"] = [value if i == 2 else i % 3 for i in range(6)]
        datasets.Dataset.from_dict(rows, features=datasets.Features({**_hf_set(1).features, "num": datasets.Value("int64")})).save_to_disk(str(plain))
        with pytest.raises(ConfigError, match=f"column 'num' of split 'train' has 1 label\\(s\\) missing or negative \\(e.g. {shown}\\)"):
            load_data(DataConfig(name=f"hf:{plain}", hf_image_key="img", hf_label_keys=["num"]))


# --- torchvision ------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # type 0x08 = unsigned byte
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_local_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 25 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    cfg = DataConfig(name="torchvision:MNIST", root=str(tmp_path), img_size=16, max_train=20)
    split = load_data(cfg)
    assert split.train.images.shape == (20, 3, 16, 16)
    assert split.test.images.shape == (10, 3, 16, 16)
    assert split.train.num_classes == {"label": 10}
    assert torch.equal(split.test.labels["label"], torch.arange(10))
    # brightness follows the label the images were written with
    means = split.test.images.mean(dim=(1, 2, 3))
    assert torch.all(means[1:] > means[:-1])


def test_torchvision_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.download=true or point data.root"):
        load_data(DataConfig(name="torchvision:MNIST", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="no data set 'NoSuchSet'"):
        load_data(DataConfig(name="torchvision:NoSuchSet", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="data.root: .*needs data.root"):
        load_data(DataConfig(name="torchvision:MNIST"))
    with pytest.raises(ConfigError, match="torchvision:EMNIST could not be built with .*'split': 'train'.*imagefolder or hf:"):
        load_data(DataConfig(name="torchvision:EMNIST", root=str(tmp_path)))


# --- config validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"name": "cifar"}, r"data.name: unknown data set 'cifar'"),
        ({"name": "digits:x"}, r"data.name: unknown data set"),
        ({"name": "hf:"}, r"data.name: .*names no data set"),
        ({"img_size": 2}, r"data.img_size: must be at least 4"),
        ({"channels": 2}, r"data.channels: must be 1 or 3"),
        ({"test_fraction": 1.0}, r"data.test_fraction"),
        ({"test_fraction": 0}, r"data.test_fraction"),
        ({"max_train": 0}, r"data.max_train: must be positive"),
        ({"max_test": -1}, r"data.max_test: must be positive"),
        ({"num_samples": 1}, r"data.num_samples"),
        ({"seed": -1}, r"data.seed"),
        ({"tasks": []}, r"data.tasks: must name at least one"),
        ({"tasks": ["digit", "digit"]}, r"data.tasks: lists a task twice"),
        ({"hf_label_keys": []}, r"data.hf_label_keys"),
        ({"name": "imagefolder"}, r"data.root: .*needs data.root"),
        ({"colour": 1}, r"unknown key data.colour"),
    ],
)
def test_config_validation(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict(DataConfig, data, prefix="data.")


def test_config_defaults_are_valid() -> None:
    cfg = from_dict(DataConfig, {"name": "shapes", "tasks": ["count"]}, prefix="data.")
    assert cfg.img_size == 32 and cfg.hf_label_keys == ["label"]


# --- partitioning -----------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 60)  # 600 samples, 10 classes


def _check_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert all(p.dtype == np.int64 for p in parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def test_iid_partitions() -> None:
    parts = partition_indices(LABELS, 7, "iid", seed=0)
    _check_disjoint_cover(parts, len(LABELS))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    same = partition_indices(LABELS, 7, "iid", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    other = partition_indices(LABELS, 7, "iid", seed=1)
    assert not all(
        np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(parts, other, strict=True)
    )


def _label_spread(parts: list[np.ndarray]) -> float:
    """Largest total-variation distance between a partition's label distribution and the global one."""
    hists = np.stack([np.bincount(LABELS[p], minlength=10) / len(p) for p in parts])
    return float(np.abs(hists - 0.1).sum(axis=1).max() / 2)


def test_dirichlet_partitions_are_non_iid_and_seeded() -> None:
    parts = partition_indices(LABELS, 5, "dirichlet", alpha=0.1, seed=0, min_partition_size=10)
    _check_disjoint_cover(parts, len(LABELS))
    assert min(map(len, parts)) >= 10
    iid = partition_indices(LABELS, 5, "iid", seed=0)
    assert _label_spread(parts) > 0.4 > _label_spread(iid)
    same = partition_indices(LABELS, 5, "dirichlet", alpha=0.1, seed=0, min_partition_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    other = partition_indices(LABELS, 5, "dirichlet", alpha=0.1, seed=1, min_partition_size=10)
    assert not all(
        np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(parts, other, strict=True)
    )


def test_self_balancing_dirichlet_leaves_clients_fewer_classes() -> None:
    """PFLlib's and NIID-Bench's rule: a client over the average share gets none of the later
    classes, so at the same alpha its data is more skewed than flwr-datasets' default split."""
    labels = np.repeat(np.arange(10), 500)

    def majority_share(balanced: bool) -> float:
        shares = []
        for seed in range(5):
            parts = partition_indices(labels, 20, "dirichlet", alpha=0.1, seed=seed, min_partition_size=20, self_balancing=balanced)
            _check_disjoint_cover(parts, len(labels))
            assert min(map(len, parts)) >= 20
            shares.append(sum(np.bincount(labels[p], minlength=10).max() for p in parts) / len(labels))
        return float(np.mean(shares))

    assert majority_share(True) > majority_share(False) + 0.05
    with pytest.raises(ConfigError, match="self_balancing applies to the dirichlet scheme only"):
        partition_indices(LABELS, 3, "iid", self_balancing=True)


def test_partition_skew_summary() -> None:
    """simulations.partition_skew's per-client summary, examples-weighted: one client of a
    single class, one of two classes 3:1."""
    from simulations.partition_skew import skew

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    got = skew(labels, [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])])
    two = float(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    assert got == pytest.approx({"largest_class_share": (4 * 1.0 + 4 * 0.75) / 8, "effective_classes": (4 * 1.0 + 4 * two) / 8, "classes_over_5pct": 1.5})


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")
def test_pathological_classes_per_partition() -> None:
    parts = partition_indices(LABELS, 10, "pathological", classes_per_partition=2, seed=0)
    _check_disjoint_cover(parts, len(LABELS))  # deterministic: partition p has p and p+1
    for p, part in enumerate(parts):
        assert set(LABELS[part].tolist()) == {p, (p + 1) % 10}
    other = partition_indices(LABELS, 10, "pathological", classes_per_partition=2, seed=1)
    assert not all(
        np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(parts, other, strict=True)
    )
    rand = partition_indices(
        LABELS, 10, "pathological", classes_per_partition=3, seed=0, class_assignment="random"
    )
    assert all(len(set(LABELS[p].tolist())) == 3 for p in rand)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_partitions": 3, "scheme": "zipf"}, "unknown partition scheme 'zipf'"),
        ({"num_partitions": 0}, "num_partitions must be between 1"),
        ({"num_partitions": 601}, r"num_partitions .*\(600\)"),
        ({"num_partitions": 3, "scheme": "dirichlet", "alpha": 0}, "alpha must be > 0"),
        (
            {"num_partitions": 10, "scheme": "dirichlet", "min_partition_size": 61},
            "min_partition_size=61 is impossible",
        ),
        (
            {"num_partitions": 3, "scheme": "pathological", "classes_per_partition": 11},
            r"classes_per_partition must be between 1 and the number of classes \(10\)",
        ),
        (
            {"num_partitions": 3, "scheme": "pathological", "class_assignment": "greedy"},
            "unknown class_assignment 'greedy'",
        ),
    ],
)
def test_partition_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        partition_indices(LABELS, **kwargs)


def test_dirichlet_that_cannot_meet_min_size_is_a_clear_error() -> None:
    # feasible in principle (10 x 55 <= 600) but near-impossible with a tiny alpha
    with pytest.raises(ConfigError, match="could not give all 10 partitions .*raise alpha"):
        partition_indices(LABELS, 10, "dirichlet", alpha=0.01, min_partition_size=55)


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")
def test_pathological_partitions_that_leave_a_class_to_no_client_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"gives classes \[9\] to no client \(8 clients x 2 classes"):
        partition_indices(LABELS, 8, "pathological", classes_per_partition=2, seed=0)
    # nor to new clients only: they never train
    from fedtune.federated import federated_data
    from tests.test_federated import tiny_run

    def run(k):
        return tiny_run(partition={"scheme": "pathological", "classes_per_partition": k, "min_partition_size": 1},
                        federation={"num_clients": 8, "new_clients": 2, "personalization": "lda"})

    with pytest.raises(ConfigError, match=r"gives classes \[9\] to new clients only"):
        federated_data(run(2))
    assert len(federated_data(run(3))[1]) == 10


def test_bad_partition_and_split_values_are_config_errors_naming_the_key() -> None:
    from fedtune.runconfig import PartitionConfig

    for over, key in (({"alpha": 0.0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"classes_per_partition": 0}, "classes_per_partition"),
                      ({"min_partition_size": -3}, "min_partition_size")):
        with pytest.raises(ConfigError, match=f"partition.{key}: "):
            PartitionConfig(**over).validate("partition.")
    with pytest.raises(ConfigError, match="data.hf_test_split: 'train' is the training split too"):
        DataConfig(name="hf:x", hf_train_split="train", hf_test_split="train").validate("data.")


def test_pathological_too_many_partitions_per_class() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(ConfigError, match="pathological partitioning failed"):
        partition_indices(labels, 6, "pathological", classes_per_partition=3)


# --- Fashion-MNIST ----------------------------------------------------------------------------

FASHION_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _write_fashion(folder: Path, gz: bool, n_train: int = 30, n_test: int = 10) -> None:
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 25 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            _write_idx(folder / stem, array)
            if gz:
                (folder / (stem + ".gz")).write_bytes(gzip.compress((folder / stem).read_bytes()))
                (folder / stem).unlink()


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_root(tmp_path: Path, gz: bool) -> None:
    _write_fashion(tmp_path, gz)
    split = load_data(DataConfig(name="fashion_mnist", root=str(tmp_path), img_size=16, max_train=20))
    assert split.train.images.shape == (20, 3, 16, 16) and split.test.images.shape == (10, 3, 16, 16)
    assert split.train.tasks == ["garment"] and split.train.num_classes == {"garment": 10}
    assert split.train.class_names["garment"][0] == "T-shirt/top"
    assert torch.equal(split.test.labels["garment"], torch.arange(10))
    means = split.test.images.mean(dim=(1, 2, 3))
    assert torch.all(means[1:] > means[:-1])  # brightness follows the label written


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert len(load_data(DataConfig(name="fashion_mnist", root=str(tmp_path))).train) == 30


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Fashion-MNIST not found.*data.root.*apt-get install dataset-fashion-mnist.*data.download=true"):
        load_data(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    _write_fashion(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match="has no t10k-labels-idx1-ubyte"):
        load_data(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    _write_fashion(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte: idx file is truncated"):
        load_data(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    _write_fashion(tmp_path, gz=True)
    gz_path = tmp_path / "train-images-idx3-ubyte.gz"
    gz_path.write_bytes(gz_path.read_bytes()[:-40])
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte.gz"):
        load_data(DataConfig(name="fashion_mnist", root=str(tmp_path)))


def test_fashion_mnist_without_root_finds_an_earlier_download(tmp_path: Path, monkeypatch) -> None:
    """data.download: true without data.root puts the files in the cache; a later run without
    download finds them there when Debian's package is not installed."""
    import fedtune.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "FASHION_DEBIAN_ROOT", tmp_path / "debian")
    monkeypatch.setattr(fm, "DOWNLOAD_ROOT", tmp_path / "cache")
    with pytest.raises(ConfigError, match="debian or .*cache \\(no data.root given\\)"):
        load_data(DataConfig(name="fashion_mnist"))
    _write_fashion(tmp_path / "cache" / "FashionMNIST" / "raw", gz=True)
    assert len(load_data(DataConfig(name="fashion_mnist")).train) == 30


def test_fashion_mnist_debian_package() -> None:
    """The real files from Debian's dataset-fashion-mnist (CI installs it): a seeded subset."""
    from fedtune.data import FASHION_DEBIAN_ROOT

    if not FASHION_DEBIAN_ROOT.is_dir():
        # CI installs the package and sets FEDTUNE_REQUIRE_FMNIST: there a missing install fails
        assert not os.environ.get("FEDTUNE_REQUIRE_FMNIST"), f"FEDTUNE_REQUIRE_FMNIST is set but {FASHION_DEBIAN_ROOT} is missing"
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    split = load_data(DataConfig(name="fashion_mnist", max_train=200, max_test=100))
    assert len(split.train) == 200 and len(split.test) == 100
    assert split.train.images.shape[1:] == (3, 32, 32)
    assert set(split.train.labels["garment"].tolist()) == set(range(10))
    assert -1.0 <= float(split.train.images.min()) < float(split.train.images.max()) <= 1.0
