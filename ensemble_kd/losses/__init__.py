"""Distillation losses, one method per file, each registered by name in :data:`LOSSES`."""
from ensemble_kd.losses import cc, ce, crd, dkd, fitnet, kd, pkt, rkd, sp, vid  # noqa: F401  (registration)
from ensemble_kd.losses import gacd  # noqa: F401  (registration)
from ensemble_kd.losses import dfnd  # noqa: F401  (registration)
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, TeacherBank, build_loss

__all__ = ["LOSSES", "DistillInputs", "LossContext", "TeacherBank", "build_loss"]
