"""Plugins: a user's own modules, imported before anything is built, so that the datasets, encoders
and losses they define register themselves the way the built-in ones do (``plugins:`` in the
config; the example: docs/plugins.md).

Registration happens on import, and the registries are per process: the driver imports the
plugins when it loads a config (``pipeline.load``), and every Ray worker process imports them
again at start (``raycluster.setup_worker``, the job's ``worker_process_setup_hook``), because
teachers, students and losses are built inside Ray Train workers and Tune trials, which look
their names up in their own registries. This module sits in the bottom layer: it imports only
:mod:`ensemble_kd.core.config` and the standard library, so a worker can run it before anything else.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

from ensemble_kd.core.config import ConfigError

ENV_VAR = "EKD_PLUGINS"
"""The plugin modules, comma-separated, in the environment of a Ray job's workers (``ray_session``)."""


def load_plugins(names: Sequence[str], source: str | None = None) -> None:
    """Import each module in ``names``, in order. Idempotent: Python imports a module once per
    process, so a module already imported (the driver, a reused worker) is not run again.

    A module that cannot be found, or that raises while importing (a typo, a missing dependency,
    a name registered twice), is a :class:`ConfigError` of one line naming the config file
    (``source``, when given), the field (``plugins.<i>``), the module and the error, instead of
    a traceback from deep inside a run.
    """
    for i, name in enumerate(names):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported as a config error
            what = "cannot be imported" if isinstance(e, ImportError) else "raised on import"
            detail = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message
            where = f"invalid config {source}: " if source else ""
            raise ConfigError(f"{where}plugins.{i}: module {name!r} {what}: {type(e).__name__}: {detail}") from None


def env_plugins() -> list[str]:
    """The plugin modules named by :data:`ENV_VAR` (none when unset or empty)."""
    return [n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip()]
