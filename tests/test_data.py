"""edgec.data: specs, CIFAR-10 layouts (generated fixtures + the real copy), decode cache,
python factories, calibration manifests, hold-out splits, numpy export, batch augmentation."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from edgec.data import bundle, cifar10, images
from edgec.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataBundle,
    RandomCropFlip,
    calibration_subset,
    holdout_split,
    load_data,
    load_manifest,
    save_manifest,
    subset_from_manifest,
    to_numpy,
)
from edgec.errors import DataError


pytestmark = pytest.mark.usefixtures("private_cache")


# --------------------------------------------------------------------------------------------
# generated CIFAR-10 fixtures in both accepted layouts


N_PER_BATCH = 8  # 5 train batches -> 40 train images (4 per class), 20 test images (2 per class)


def _cifar_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    ytr = rng.permutation(np.arange(5 * N_PER_BATCH) % 10).astype(np.int64)
    yte = rng.permutation(np.arange(20) % 10).astype(np.int64)
    xtr = rng.integers(0, 256, size=(len(ytr), 3072), dtype=np.uint8)
    xte = rng.integers(0, 256, size=(len(yte), 3072), dtype=np.uint8)
    return xtr, ytr, xte, yte


def _write_cifar_pickles(folder: Path, arrays) -> Path:
    """The exact format of cifar-10-python.tar.gz (python 2 pickles read with bytes keys)."""
    xtr, ytr, xte, yte = arrays
    folder.mkdir(parents=True)
    for b in range(5):
        sl = slice(b * N_PER_BATCH, (b + 1) * N_PER_BATCH)
        batch = {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": [int(v) for v in ytr[sl]],
            b"data": xtr[sl],
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(N_PER_BATCH)],
        }
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in yte], b"data": xte}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": N_PER_BATCH, b"num_vis": 3072}
        pickle.dump(meta, f, protocol=2)
    return folder


def _write_cifar_folder(root: Path, arrays, ext: str = "png") -> Path:
    """ImageFolder copy: {train,test}/<class>/NNNN.<ext>, NNNN = k-th image of the class in batch order."""
    xtr, ytr, xte, yte = arrays
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        counts = {c: 0 for c in range(10)}
        for img, label in zip(x, y):
            d = root / split / CIFAR10_CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.reshape(3, 32, 32).transpose(1, 2, 0)).save(d / f"{counts[label]:04d}.{ext}")
            counts[label] += 1
    return root


@pytest.fixture
def cifar_arrays():
    return _cifar_arrays()


@pytest.fixture
def cifar_pickle_root(tmp_path, cifar_arrays) -> Path:
    _write_cifar_pickles(tmp_path / "pk" / "cifar-10-batches-py", cifar_arrays)
    return tmp_path / "pk"


@pytest.fixture
def cifar_folder_root(tmp_path, cifar_arrays) -> Path:
    return _write_cifar_folder(tmp_path / "folder", cifar_arrays)


def _raw_uint8(t: torch.Tensor) -> np.ndarray:
    """Undo the CIFAR normalisation back to uint8 pixels."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (t * std + mean).mul(255).round().to(torch.uint8).numpy()


def test_cifar_pickle_layout_matches_source(cifar_pickle_root, cifar_arrays):
    xtr, ytr, xte, yte = cifar_arrays
    b = load_data(f"cifar10:{cifar_pickle_root}")
    assert b.spec == f"cifar10:{cifar_pickle_root.resolve()}"
    assert (len(b.train), len(b.eval)) == (40, 20)
    assert b.num_classes == 10 and b.input_shape == (3, 32, 32)
    assert b.classes == list(CIFAR10_CLASSES)
    assert b.normalization["mean"] == list(CIFAR10_MEAN) and b.normalization["std"] == list(CIFAR10_STD)
    assert isinstance(b.augment, RandomCropFlip) and b.augment.padding == 4
    x, y = b.train[3]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert y.dtype == torch.int64 and y.dim() == 0
    # canonical (batch) order is kept and the pixels survive the normalisation round trip
    assert np.array_equal(b.train.tensors[1].numpy(), ytr)
    assert np.array_equal(_raw_uint8(b.train.tensors[0]), xtr.reshape(-1, 3, 32, 32))
    assert np.array_equal(_raw_uint8(b.eval.tensors[0]), xte.reshape(-1, 3, 32, 32))
    # the folder holding the batches directly works too
    b2 = load_data(f"cifar10:{cifar_pickle_root / 'cifar-10-batches-py'}")
    assert torch.equal(b2.train.tensors[0], b.train.tensors[0])


def test_cifar_imagefolder_png_equals_pickle(cifar_pickle_root, cifar_folder_root):
    pk = load_data(f"cifar10:{cifar_pickle_root}")
    fo = load_data(f"cifar10:{cifar_folder_root}")
    assert fo.classes == pk.classes == list(CIFAR10_CLASSES)
    assert fo.input_shape == pk.input_shape and fo.normalization == pk.normalization
    for a, b in ((pk.train, fo.train), (pk.eval, fo.eval)):
        ya, yb = a.tensors[1], b.tensors[1]
        assert torch.equal(torch.bincount(ya, minlength=10), torch.bincount(yb, minlength=10))
        for c in range(10):  # folder order is class-major; within a class both keep batch order
            assert torch.equal(a.tensors[0][ya == c], b.tensors[0][yb == c])


def test_cifar_imagefolder_jpg(tmp_path, cifar_arrays):
    root = _write_cifar_folder(tmp_path / "jpg", cifar_arrays, ext="jpg")
    b = load_data(f"cifar10:{root}")
    assert (len(b.train), len(b.eval)) == (40, 20)
    assert b.train.tensors[0].shape == (40, 3, 32, 32)
    assert torch.equal(torch.bincount(b.train.tensors[1]), torch.full((10,), 4))


def test_max_train_eval_stratified_and_seeded(cifar_pickle_root):
    a = load_data(f"cifar10:{cifar_pickle_root}", max_train=20, max_eval=10, seed=1)
    b = load_data(f"cifar10:{cifar_pickle_root}", max_train=20, max_eval=10, seed=1)
    c = load_data(f"cifar10:{cifar_pickle_root}", max_train=20, max_eval=10, seed=2)
    assert (len(a.train), len(a.eval)) == (20, 10)
    assert torch.equal(torch.bincount(a.train.tensors[1], minlength=10), torch.full((10,), 2))
    assert torch.equal(torch.bincount(a.eval.tensors[1], minlength=10), torch.ones(10, dtype=torch.int64))
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_stratified_indices_proportional():
    labels = np.array([0] * 80 + [1] * 20)
    idx = bundle._stratified_indices(labels, 10, seed=0, salt=0)
    assert len(idx) == 10 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [8, 2]
    assert np.array_equal(bundle._stratified_indices(labels, None, 0, 0), np.arange(100))


def test_decode_cache_written_once_and_reused(cifar_folder_root, monkeypatch):
    cache = Path(os.environ["EDGEC_CACHE"])
    sub = load_data(f"cifar10:{cifar_folder_root}", max_train=10, max_eval=10)
    assert len(sub.train) == 10
    assert not list(cache.glob("*.npy")), "a subset load with no cache decodes only the subset, writes nothing"
    first = load_data(f"cifar10:{cifar_folder_root}")
    files = sorted(p.name for p in cache.glob("*.npy"))
    assert len(files) == 2 and not list(cache.glob("*.tmp"))

    def no_decode(*a, **k):
        raise AssertionError("should have been served from the cache")

    with monkeypatch.context() as m:
        m.setattr(images, "_decode_images", no_decode)
        again = load_data(f"cifar10:{cifar_folder_root}")
        assert torch.equal(first.train.tensors[0], again.train.tensors[0])
        sub2 = load_data(f"cifar10:{cifar_folder_root}", max_train=10, max_eval=10)
        assert torch.equal(sub.train.tensors[0], sub2.train.tensors[0])  # same subset, from the cache
    # a new file changes the key: decoded again into a new cache file
    Image.new("RGB", (32, 32)).save(cifar_folder_root / "train" / "cat" / "9999.png")
    grown = load_data(f"cifar10:{cifar_folder_root}")
    assert len(grown.train) == 41
    assert len(list(cache.glob("*.npy"))) == 3


def test_decode_pool_matches_serial(cifar_folder_root):
    paths = sorted(str(p) for p in (cifar_folder_root / "train").rglob("*.png"))
    serial = images._decode_images(paths, "RGB", (32, 32), workers=1)
    pooled = images._decode_images(paths, "RGB", (32, 32), workers=2)
    assert serial.shape == (40, 3, 32, 32) and serial.dtype == np.uint8
    assert np.array_equal(serial, pooled)


# --------------------------------------------------------------------------------------------
# errors: layout, path, kind


def test_cifar_wrong_layout_states_both_layouts(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as ei:
        load_data(f"cifar10:{tmp_path}")
    msg = str(ei.value)
    assert "not a CIFAR-10 folder" in msg and "images" in msg
    for part in ("data_batch_1", "data_batch_5", "test_batch", "cifar-10-batches-py", "train/<class>", "test/<class>"):
        assert part in msg


def test_cifar_missing_pickle_and_half_folder(tmp_path, cifar_arrays):
    folder = _write_cifar_pickles(tmp_path / "pk", cifar_arrays)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3") as ei:
        load_data(f"cifar10:{folder}")
    assert "ImageFolder" in str(ei.value)
    (tmp_path / "half" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no test/ folder"):
        load_data(f"cifar10:{tmp_path / 'half'}")


def test_cifar_rejects_code_in_pickle(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    for name in (*cifar10._CIFAR_TRAIN_BATCHES, "test_batch"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": os.system, b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        load_data(f"cifar10:{folder}")


def test_missing_path_and_unknown_kind(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="did you mean 'cifar10'"):
        load_data("cifar:/data")
    with pytest.raises(DataError, match="did you mean 'imagefolder'"):
        load_data("imagefoldr:/data")
    with pytest.raises(DataError, match="needs an argument"):
        load_data("cifar10")
    with pytest.raises(DataError, match="max_train"):
        load_data("digits", max_train=0)


# --------------------------------------------------------------------------------------------
# generic image folders


def _gray_folder(root: Path, eval_name: str = "val", size=(6, 5)) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), (eval_name, 3)):
        for cls in ("no", "yes"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8), mode="L").save(d / f"{i}.png")
    return root


def test_imagefolder_generic_val_split_and_stats(tmp_path):
    root = _gray_folder(tmp_path / "gray")
    (root / "train" / "no" / "readme.txt").write_text("ignored: not an image")
    b = load_data(f"imagefolder:{root}")
    assert b.classes == ["no", "yes"] and b.num_classes == 2
    assert b.input_shape == (1, 5, 6)  # C, H, W
    assert (len(b.train), len(b.eval)) == (12, 6)
    assert b.augment is None and b.normalization["input_scale"] == pytest.approx(1 / 255)
    x = b.train.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and float(x.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert len(b.normalization["mean"]) == len(b.normalization["std"]) == 1


def test_imagefolder_mixed_sizes_names_first_offender(tmp_path):
    root = _gray_folder(tmp_path / "gray", eval_name="test")
    Image.new("L", (7, 7)).save(root / "train" / "yes" / "3.png")
    Image.new("L", (9, 9)).save(root / "train" / "yes" / "4.png")
    with pytest.raises(DataError, match=r"yes/3\.png' is 7x7, expected 6x5"):
        load_data(f"imagefolder:{root}")


def test_imagefolder_layout_errors(tmp_path):
    (tmp_path / "a" / "train" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no test/ or val/ folder") as ei:
        load_data(f"imagefolder:{tmp_path / 'a'}")
    assert "PATH/train/<class>/<image>" in str(ei.value)
    (tmp_path / "a" / "test" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_data(f"imagefolder:{tmp_path / 'a'}")
    root = _gray_folder(tmp_path / "b", eval_name="test")
    (root / "test" / "maybe").mkdir()
    with pytest.raises(DataError, match="not present in the train split: maybe"):
        load_data(f"imagefolder:{root}")


# --------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_and_determinism():
    a = load_data("digits", seed=0)
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8) and a.classes == [str(i) for i in range(10)]
    assert (len(a.train), len(a.eval)) == (1437, 360)
    assert a.augment is None and a.normalization["input_scale"] == pytest.approx(1 / 16)
    x, y = a.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(a.train.tensors[0].mean())) < 1e-5
    assert torch.bincount(a.eval.tensors[1]).min() >= 35  # stratified: every class ~36
    b = load_data("digits", seed=0)
    c = load_data("digits", seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.eval.tensors[1], b.eval.tensors[1])
    assert not torch.equal(a.train.tensors[1], c.train.tensors[1])
    small = load_data("digits", max_train=100, max_eval=50)
    assert (len(small.train), len(small.eval)) == (100, 50)
    assert torch.equal(torch.bincount(small.train.tensors[1]), torch.full((10,), 10))
    with pytest.raises(DataError, match="no argument"):
        load_data("digits:foo")


# --------------------------------------------------------------------------------------------
# python:module:factory


FACTORY_SRC = '''
import torch
from torch.utils.data import Dataset, TensorDataset
from helper_mod import N_FEATURES  # a sibling module: the file's folder is importable

def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, N_FEATURES, N_FEATURES, generator=g)
    y = torch.arange(30) % 4
    return TensorDataset(x[:20], y[:20]), TensorDataset(x[20:], y[20:])

class Named(Dataset):
    classes = ["a", "b", "c"]
    normalization = {"mean": [0.5], "std": [0.25]}
    def __len__(self):
        return 7
    def __getitem__(self, i):
        return torch.full((1, 3, 3), float(i)), i % 2

def named():
    return Named(), Named()

def bundle():
    from edgec.data import load_data
    b = load_data("digits")
    b.spec = ""
    return b

def broken():
    return [1, 2, 3]

def bad_sample():
    return [(1, 2)], [(1, 2)]
'''


@pytest.fixture
def factory_file(tmp_path):
    (tmp_path / "helper_mod.py").write_text("N_FEATURES = 4\n")
    path = tmp_path / "my_data.py"
    path.write_text(FACTORY_SRC)
    yield path
    for name in ("my_data", "helper_mod"):  # imported by the tests; forgotten afterwards
        sys.modules.pop(name, None)


def test_python_file_factory(factory_file):
    b = load_data(f"python:{factory_file}:make")
    assert b.num_classes == 4 and b.classes == ["0", "1", "2", "3"]
    assert b.input_shape == (2, 4, 4) and (len(b.train), len(b.eval)) == (20, 10)
    assert b.augment is None and b.normalization == {}
    n = load_data(f"python:{factory_file}:named", max_train=5, max_eval=3, seed=3)
    assert n.num_classes == 3 and n.classes == ["a", "b", "c"] and n.input_shape == (1, 3, 3)
    assert n.normalization == {"mean": [0.5], "std": [0.25]}
    assert isinstance(n.train, Subset) and len(n.train) == 5 and len(n.eval) == 3
    assert list(n.train.indices) == list(load_data(f"python:{factory_file}:named", max_train=5, seed=3).train.indices)
    bb = load_data(f"python:{factory_file}:bundle", max_train=50)
    assert isinstance(bb, DataBundle) and len(bb.train) == 50 and bb.spec.startswith("python:")


def test_python_module_factory_from_cwd(factory_file, monkeypatch):
    monkeypatch.chdir(factory_file.parent)
    monkeypatch.syspath_prepend(str(factory_file.parent))  # for helper_mod; cleaned up after
    b = load_data("python:my_data:make")
    assert b.num_classes == 4


def test_python_factory_errors(factory_file, tmp_path):
    with pytest.raises(DataError, match="did you mean 'make'"):
        load_data(f"python:{factory_file}:mak")
    with pytest.raises(DataError, match="expected \\(train_dataset, eval_dataset\\)"):
        load_data(f"python:{factory_file}:broken")
    with pytest.raises(DataError, match="expected a tuple \\(x: float tensor"):
        load_data(f"python:{factory_file}:bad_sample")
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"python:{tmp_path / 'missing.py'}:make")
    with pytest.raises(DataError, match="cannot import python module 'no_such_mod_xyz'"):
        load_data("python:no_such_mod_xyz:make")
    with pytest.raises(DataError, match="bad python data spec"):
        load_data("python:only_module")


# --------------------------------------------------------------------------------------------
# calibration manifests, hold-out, numpy


def _toy(n: int = 50) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % 5)


def test_calibration_subset_manifest(tmp_path):
    ds = _toy(50)
    sub, man = calibration_subset(ds, 8, seed=7)
    sub2, man2 = calibration_subset(ds, 8, seed=7)
    _, man3 = calibration_subset(ds, 8, seed=8)
    assert man == man2 and man["indices"] != man3["indices"]
    assert set(man) == {"n", "seed", "indices", "dataset_len", "sha256"}
    assert man["n"] == 8 and man["seed"] == 7 and man["dataset_len"] == 50
    assert man["indices"] == sorted(set(man["indices"])) and list(sub.indices) == man["indices"]
    assert man["sha256"] == hashlib.sha256(json.dumps(man["indices"], separators=(",", ":")).encode()).hexdigest()
    assert [int(sub[i][0].item()) for i in range(8)] == man["indices"]

    path = tmp_path / "calib" / "manifest.json"
    save_manifest(man, path)
    assert load_manifest(path) == man and not list(path.parent.glob("*.tmp"))
    assert list(subset_from_manifest(ds, load_manifest(path)).indices) == man["indices"]
    with pytest.raises(DataError, match="made for a dataset of 50"):
        subset_from_manifest(_toy(40), man)

    tampered = dict(man, indices=[0] + man["indices"][1:])
    path.write_text(json.dumps(tampered))
    with pytest.raises(DataError, match="inconsistent"):
        load_manifest(path)
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "none.json")
    with pytest.raises(DataError, match="only 50"):
        calibration_subset(ds, 51, seed=0)


def test_holdout_split():
    ds = _toy(50)
    rest, hold = holdout_split(ds, 0.2, seed=0)
    assert (len(rest), len(hold)) == (40, 10)
    assert sorted(set(rest.indices) | set(hold.indices)) == list(range(50))
    assert not set(rest.indices) & set(hold.indices)
    assert holdout_split(ds, 0.2, seed=0)[1].indices == hold.indices
    assert holdout_split(ds, 0.2, seed=1)[1].indices != hold.indices
    with pytest.raises(DataError, match="between 0 and 1"):
        holdout_split(ds, 1.0, seed=0)


class _ListDataset(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.full((2, 3), float(i)), torch.tensor(i % 3)


def test_to_numpy():
    ds = _toy(20)
    x, y = to_numpy(ds)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (20, 1, 1, 1) and y.shape == (20,)
    x, y = to_numpy(Subset(Subset(ds, [3, 5, 7, 9]), [1, 3]))
    assert x.ravel().tolist() == [5.0, 9.0] and y.tolist() == [0, 4]
    x, y = to_numpy(_ListDataset(), limit=4)
    assert x.shape == (4, 2, 3) and y.tolist() == [0, 1, 2, 0] and x.dtype == np.float32


# --------------------------------------------------------------------------------------------
# batch augmentation


def test_random_crop_flip():
    x = torch.randn(16, 3, 8, 8)
    aug = RandomCropFlip(padding=2)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    c = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(RandomCropFlip(padding=0, flip=False)(x, torch.Generator()), x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):  # each output is one crop of the zero-padded input, maybe mirrored
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(a[i], cr) or torch.equal(a[i], cr.flip(-1)) for cr in crops)
    flipped_only = RandomCropFlip(padding=0)(x, torch.Generator().manual_seed(0))
    n_flipped = sum(torch.equal(flipped_only[i], x[i].flip(-1)) for i in range(16))
    assert 0 < n_flipped < 16


# --------------------------------------------------------------------------------------------
# the real CIFAR-10 copy (ImageFolder of JPEGs)


def _real_cifar() -> Path:
    root = os.environ.get("EDGEC_DATA")
    if not root:
        pytest.skip("EDGEC_DATA is not set (point it at the shared data folder, e.g. ../shared/data)")
    path = Path(root) / "cifar10"
    if not (path / "train").is_dir():
        pytest.skip(f"no CIFAR-10 ImageFolder at {path}")
    return path


@pytest.mark.integration
def test_real_cifar10_subset():
    path = _real_cifar()
    b = load_data(f"cifar10:{path}", max_train=500, max_eval=200, seed=0)
    assert b.classes == list(CIFAR10_CLASSES) and b.num_classes == 10
    assert b.input_shape == (3, 32, 32)
    assert b.train.tensors[0].shape == (500, 3, 32, 32) and b.eval.tensors[0].shape == (200, 3, 32, 32)
    assert torch.equal(torch.bincount(b.train.tensors[1], minlength=10), torch.full((10,), 50))
    assert torch.equal(torch.bincount(b.eval.tensors[1], minlength=10), torch.full((10,), 20))
    x = b.train.tensors[0]
    # normalised with the CIFAR statistics: per-channel mean near 0, std near 1, pixel range bounds
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.15
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.15
    lo = torch.tensor([-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)])
    assert torch.allclose(x.amin(dim=(0, 2, 3)), lo, atol=1e-4)
    # determinism, and the first selected sample is the image file it should be
    again = load_data(f"cifar10:{path}", max_train=500, max_eval=200, seed=0)
    assert torch.equal(again.train.tensors[0], x)
    scan = images._scan_split(path / "train", layout="")
    first = bundle._stratified_indices(scan.labels, 500, 0, 1)[0]
    pixels = np.asarray(Image.open(scan.paths[first]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(_raw_uint8(x[:1])[0], pixels)
    assert int(b.train.tensors[1][0]) == int(scan.labels[first])
