"""The shipped UCI Multiple Features data: shape, labels, split and known raw values."""
import numpy as np
import pytest
import torch

from modalities import build_dataset
from modalities.datasets.uci_mfeat import VIEWS, load_raw

DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}


def test_raw_shapes_and_labels():
    raw = load_raw()
    for v, d in DIMS.items():
        assert raw[v].shape == (2000, d), v
    assert (raw["labels"] == np.repeat(np.arange(10), 200)).all()  # UCI row order: 200 per digit, class-major
    assert raw["is_test"].sum() == 500
    assert (np.bincount(raw["labels"][raw["is_test"]]) == 50).all()


def test_known_values_from_the_uci_files():
    # First row of mfeat-fou, mfeat-fac, mfeat-kar, mfeat-pix as published.
    raw = load_raw()
    np.testing.assert_allclose(raw["fou"][0, :3], [0.065882, 0.19731, 0.10383], rtol=1e-6)
    np.testing.assert_array_equal(raw["fac"][0, :3], [98, 236, 531])
    np.testing.assert_allclose(raw["kar"][0, :3], [-10.297, -11.667, 11.561], rtol=1e-6)
    np.testing.assert_array_equal(raw["pix"][0, :3], [0, 3, 4])
    assert raw["pix"].min() == 0 and raw["pix"].max() == 6
    assert raw["fac"].max() == 1353 and raw["mor"].max() == 17572


def test_splits_are_disjoint_and_stable():
    tr, te = build_dataset("uci-mfeat", "train"), build_dataset("uci-mfeat", "test")
    assert len(tr) == 1500 and len(te) == 500
    assert not set(tr.sample_ids.tolist()) & set(te.sample_ids.tolist())
    assert (tr.labels == tr.sample_ids // 200).all()
    assert tr.fingerprint() == build_dataset("uci-mfeat", "train").fingerprint() != te.fingerprint()


def test_modalities_and_normalisation():
    tr = build_dataset("uci-mfeat", "train")
    assert set(tr.modalities) == set(VIEWS)
    assert tr.spec("pix").shape == (1, 16, 15) and tr.spec("pix").kind == "image"
    assert tr.spec("fou").shape == (76,) and tr.spec("fou").kind == "vector"
    b = tr.get_batch(np.arange(len(tr)))
    fou = b["inputs"]["fou"]
    assert torch.allclose(fou.mean(0), torch.zeros(76), atol=1e-4) and torch.allclose(fou.std(0, unbiased=False), torch.ones(76), atol=1e-3)
    assert 0 <= float(b["inputs"]["pix"].min()) and float(b["inputs"]["pix"].max()) <= 1


def test_item_matches_batch_and_positions():
    te = build_dataset("uci-mfeat", "test")
    item = te[7]
    b = te.get_batch([7])
    assert item["sample_id"] == int(b["sample_id"][0]) and item["label"] == int(b["label"][0])
    for m in VIEWS:
        assert torch.equal(item["inputs"][m], b["inputs"][m][0])
    ids = te.sample_ids[[5, 3, 9]]
    assert (te.positions_of(ids) == [5, 3, 9]).all()
    with pytest.raises(KeyError, match="no sample_id"):
        te.positions_of(np.array([te.sample_ids.max() + 10_000]))
    with pytest.raises(ValueError, match="no modality 'rgb'"):
        te.get_batch([0], ["rgb"])
