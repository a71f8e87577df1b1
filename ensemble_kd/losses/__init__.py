"""Distillation losses, one method per file, each a class registered by name in :data:`LOSSES`
(the contract: :mod:`ensemble_kd.losses.base`)."""
from ensemble_kd.losses import at, cc, ce, crd, dkd, fitnet, kd, pkt, rkd, sp, vid  # noqa: F401  (registration)
from ensemble_kd.losses import ab, fsp, ft, hint, nst, sp_map, vid_map  # noqa: F401  (registration: feature-map methods)
from ensemble_kd.losses import gacd  # noqa: F401  (registration)
from ensemble_kd.losses import dfnd  # noqa: F401  (registration)
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, TeacherBank, build_loss

__all__ = ["LOSSES", "DistillInputs", "LossContext", "LossOutput", "TeacherBank", "build_loss"]
