"""FT: Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
NeurIPS 2018.

A paraphraser (a convolutional auto-encoder) is first trained, unsupervised, to reconstruct the
teacher's last feature map; its encoder's output is the teacher's "factor". Then a translator (a
convolutional encoder) on the student's last map is trained with the student so that the student's
factor matches the teacher's: the L1 distance of the L2-normalised spatial maps mean_c f^2,

    factor(f) = normalize(mean_c f^2)       loss = mean_{b,hw} |factor(T(f_s)) - factor(P(f_t))|

How it maps to the reference (RepDistiller: ``Paraphraser``/``Translator`` in ``models/util.py``,
``FactorTransfer``, the ``factor`` branch of ``train_student.py`` and ``helper/pretrain.py``):

- Maps: the last map before pooling on both sides (``feat[-2]``); the paraphraser and translator
  layers are the reference's (rate k = 0.5, LeakyReLU 0.1; BN in the translator only); p1 = 2, p2 = 1.
- Paraphraser stage: the reference trains the paraphraser alone for ``--init_epochs`` (30) epochs
  before distillation, on the teacher's maps, with MSE(reconstruction, map) and its own SGD (lr 0.01
  for its CIFAR resnet/wrn students, momentum 0.9, weight decay 5e-4), the student untouched. Here the
  stage is chosen by ``DistillInputs.epoch``: while ``epoch < init_epochs`` every step takes one such
  SGD step on the paraphraser (``init_lr``, ``init_momentum``, ``init_weight_decay``) inside this loss,
  on the batch's teacher maps, in float32 (outside autocast). The paraphraser's parameters have
  ``requires_grad`` off, so the run's optimiser, DDP and the loss weight never touch them; its
  momentum is a buffer (checkpointed with the module); under DDP its gradient is averaged over the
  ranks first (every rank keeps the same paraphraser, as one SGD on the global batch would). The
  term's value is an exact zero in these epochs; ``ft/<teacher>/rec`` logs the reconstruction MSE.
- Factor stage (``epoch >= init_epochs``): the paraphraser is frozen (its encoder runs under
  ``no_grad``, as the reference leaves it out of the optimiser) and the term is the factor loss;
  the translator trains with the student by the run's optimiser. The reference trains it with
  weight beta = 200.
- Differences: the paraphraser epochs are epochs of the run, so the other configured terms (CE, KD)
  train the student meanwhile (the reference's student waits; set ``distill.epochs`` to the
  reference's 240 + ``init_epochs`` for as many distillation epochs) and the run's learning-rate
  schedule counts them. During them the translator is in the graph with a zero coefficient (so DDP
  sees every parameter used): its gradient is exactly zero, so only the run's weight decay acts on
  it, scaling all its parameters by one common factor; conv-BN layers and the factor's
  normalisation make its output's factor invariant to that scale (up to BN's eps).

Every teacher has its own paraphraser and translator; an ensemble is sum_k w_k * FT_k.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ensemble_kd.core import dist
from ensemble_kd.losses._featmaps import check_map, context_shapes, require_maps, zero_touching
from ensemble_kd.losses._util import as_float, module_keys, weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import ft


def _conv_block(convs: list[nn.Module], channels: list[int], bn: bool) -> nn.Sequential:
    """conv - [BN] - LeakyReLU(0.1) per conv (an Identity where the reference has an empty BN slot)."""
    layers: list[nn.Module] = []
    for conv, c in zip(convs, channels):
        # BN without running statistics: used in training mode only, and per-rank statistics would differ under DDP
        layers += [conv, nn.BatchNorm2d(c, track_running_stats=False) if bn else nn.Identity(), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The reference's paraphraser: encoder C -> C -> kC -> kC (3x3 convs), decoder back to C (3x3
    transposed convs); no BN (the reference's default ``use_bn=False``)."""

    def __init__(self, channels: int, rate: float) -> None:
        super().__init__()
        c, k = channels, int(channels * rate)
        self.encoder = _conv_block([nn.Conv2d(c, c, 3, 1, 1), nn.Conv2d(c, k, 3, 1, 1), nn.Conv2d(k, k, 3, 1, 1)],
                                   [c, k, k], bn=False)
        self.decoder = _conv_block([nn.ConvTranspose2d(k, k, 3, 1, 1), nn.ConvTranspose2d(k, c, 3, 1, 1),
                                    nn.ConvTranspose2d(c, c, 3, 1, 1)], [k, c, c], bn=False)

    def forward(self, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(f_t)  # (B, kC, H, W)
        return factor, self.decoder(factor)  # (B, C, H, W) the reconstruction


class Translator(nn.Module):
    """The reference's translator: C_s -> C_s -> kC_t -> kC_t (3x3 convs), each with BN; the convs have
    no bias (the reference's is cancelled by the train-mode BN after it: it only gets zero gradients) and
    the BNs keep no running statistics (see ConvReg)."""

    def __init__(self, s_channels: int, t_channels: int, rate: float) -> None:
        super().__init__()
        c, k = s_channels, int(t_channels * rate)
        self.encoder = _conv_block([nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.Conv2d(c, k, 3, 1, 1, bias=False),
                                    nn.Conv2d(k, k, 3, 1, 1, bias=False)], [c, k, k], bn=True)

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        return self.encoder(f_s)  # (B, kC_t, H_s, W_s)


class ParaphraserStage(nn.Module):
    """A paraphraser and its own SGD (momentum in a buffer); its parameters never require grad, so
    only :meth:`step` changes them."""

    def __init__(self, channels: int, rate: float, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__()
        self.net = Paraphraser(channels, rate)
        self.net.requires_grad_(False)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        n = sum(p.numel() for p in self.net.parameters())
        self.register_buffer("momentum_buffer", torch.zeros(n))  # (n,) the SGD momentum, flat
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def step(self, f_t: torch.Tensor) -> torch.Tensor:
        """One SGD step on MSE(reconstruction, f_t) (torch.optim.SGD's update, no dampening);
        returns the loss before the step (detached)."""
        params = dict(self.net.named_parameters())
        live = {n: p.detach().requires_grad_(True) for n, p in params.items()}  # same storage, own autograd leaf
        with torch.enable_grad(), torch.autocast(f_t.device.type, enabled=False):
            target = as_float(f_t).detach().to(self.momentum_buffer.dtype)  # (B, C, H, W)
            _, rec = functional_call(self.net, live, (target,))
            loss = F.mse_loss(rec, target)
            grads = torch.autograd.grad(loss, list(live.values()))
        with torch.no_grad():
            g = dist.all_reduce_mean(torch.cat([x.reshape(-1) for x in grads]))  # (n,) one paraphraser on every rank
            flat = torch.cat([p.reshape(-1) for p in params.values()])  # (n,)
            d = g + self.weight_decay * flat
            # the first step starts the buffer at d (torch.optim.SGD's rule), decided on the device:
            # no read of the step count back to the host on every step
            self.momentum_buffer.copy_(torch.where(self.steps == 0, d, self.momentum_buffer * self.momentum + d))
            self.steps += 1
            off = 0
            for p in params.values():
                p.sub_(self.lr * self.momentum_buffer[off:off + p.numel()].view_as(p))
                off += p.numel()
        return loss.detach()


@LOSSES.register("ft", needs_teachers=True, needs=("feature_maps",),
                 paper="Kim et al., Paraphrasing Complex Network: Network Compression via Factor Transfer, NeurIPS 2018")
class FTLoss(nn.Module):
    """Paraphraser epochs (``epoch < init_epochs``): train each teacher's paraphraser, term 0; then
    sum_k w_k * ft(translator_k(student's last map), paraphraser_k factor of teacher_k's last map).

    Metrics, in the paraphraser epochs only: ``ft/<teacher>/rec`` (the reconstruction MSE before each step).
    """

    def __init__(self, ctx: LossContext, *, init_epochs: int = 30, init_lr: float = 0.01, init_momentum: float = 0.9,
                 init_weight_decay: float = 5e-4, rate: float = 0.5,
                 teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if int(init_epochs) != init_epochs or init_epochs < 0:
            raise ValueError(f"ft: init_epochs must be an integer >= 0, got {init_epochs}")
        if init_lr <= 0 or not 0 <= init_momentum < 1 or init_weight_decay < 0:
            raise ValueError(f"ft: need init_lr > 0, 0 <= init_momentum < 1, init_weight_decay >= 0; got "
                             f"{init_lr}, {init_momentum}, {init_weight_decay}")
        if not 0 < rate <= 1:
            raise ValueError(f"ft: rate must be in (0, 1], got {rate}")
        self.init_epochs = int(init_epochs)
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        self._key = module_keys("ft", self.teachers)
        s_shapes, t_shapes = context_shapes("ft", ctx)
        s = s_shapes[-2] if len(s_shapes) > 1 else s_shapes[-1]
        check_map("ft", "the student's last stage", s)
        self.paraphrasers = nn.ModuleDict()
        self.translators = nn.ModuleDict()
        for name in self.teachers:
            t = t_shapes[name][-2] if len(t_shapes[name]) > 1 else t_shapes[name][-1]
            check_map("ft", f"teacher {name!r}'s last stage", t)
            if int(t[0] * rate) < 1:
                raise ValueError(f"ft: teacher {name!r}'s last map has {t[0]} channels: rate {rate} leaves no factor channel")
            self.paraphrasers[self._key[name]] = ParaphraserStage(t[0], rate, float(init_lr), float(init_momentum),
                                                                  float(init_weight_decay))
            self.translators[self._key[name]] = Translator(s[0], t[0], rate)
        self.to(ctx.device)

    def paraphrasing(self, epoch: int) -> bool:
        return epoch < self.init_epochs

    def forward(self, x: DistillInputs) -> LossOutput:
        require_maps("ft", x, self.teachers)
        if self.paraphrasing(x.epoch):
            metrics = {f"ft/{n}/rec": self.paraphrasers[self._key[n]].step(x.teacher_feats[n][-2]) for n in self.teachers}
            return LossOutput(zero_touching(self.translators.parameters(), x.student_logits), metrics)
        f_s = x.student_feats[-2]  # (B, C_s, H_s, W_s)

        def term(name: str) -> torch.Tensor:
            with torch.no_grad():  # frozen after its stage
                factor_t = self.paraphrasers[self._key[name]].net.encoder(x.teacher_feats[name][-2])  # (B, kC_t, H_t, W_t)
            return ft(self.translators[self._key[name]](f_s), factor_t)

        return LossOutput(weighted_teacher_sum(self.weights, term, x.student_logits))
