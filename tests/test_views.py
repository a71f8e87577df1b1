import numpy as np
import torch

from ensemble_kd.blocks.views import apply_view, draw_views


def test_identity_and_reference_crop():
    x = torch.randn(3, 2, 6, 5)
    pad = 2
    same = apply_view(x, torch.full((3,), pad), torch.full((3,), pad), torch.zeros(3, dtype=torch.bool), pad)
    assert torch.equal(same, x)
    top, left, flip = torch.tensor([0, 4, 1]), torch.tensor([3, 0, 2]), torch.tensor([True, False, True])
    out = apply_view(x, top, left, flip, pad)
    for i in range(3):  # loop reference: pad, crop, flip
        ref = torch.nn.functional.pad(x[i], (pad,) * 4)[:, top[i] : top[i] + 6, left[i] : left[i] + 5]
        ref = ref.flip(-1) if flip[i] else ref
        assert torch.equal(out[i], ref)


def test_draws_depend_on_id_not_position():
    a = draw_views(np.array([10, 11, 12]), 4, 3, True, True, seed=5)
    b = draw_views(np.array([12, 10]), 4, 3, True, True, seed=5)
    # sample 12's four views are the same whatever the batch it comes in
    assert (a.top[8:12] == b.top[0:4]).all() and (a.flip[8:12] == b.flip[0:4]).all()
    assert (a.view == np.tile(np.arange(4), 3)).all()
    assert (a.top[a.view == 0] == 3).all() and not a.flip[a.view == 0].any()  # view 0 clean
    c = draw_views(np.array([10, 11, 12]), 4, 3, True, True, seed=6)
    assert not (a.top == c.top).all()
    assert a.top.min() >= 0 and a.top.max() <= 6 and a.flip.any()
