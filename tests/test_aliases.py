"""The old module paths the docs name for library use stay importable as aliases of their new
homes (docs/design.md, "Layers"): the very same module object, so a monkeypatch or a Ray hook string
through the old path reaches the real module."""
import importlib

import pytest

ALIASES = {
    "ensemble_kd.config": "ensemble_kd.core.config",
    "ensemble_kd.checks": "ensemble_kd.orchestration.checks",
    "ensemble_kd.views": "ensemble_kd.blocks.views",
    "ensemble_kd.raycluster": "ensemble_kd.core.raycluster",
}


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_an_alias_is_the_module_itself(old):
    assert importlib.import_module(old) is importlib.import_module(ALIASES[old])


def test_the_documented_names_resolve_through_the_old_paths():
    def attr(dotted):  # how Ray resolves worker_process_setup_hook
        module, name = dotted.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    for dotted in ("ensemble_kd.config.load_config", "ensemble_kd.checks.check_config",
                   "ensemble_kd.views.apply_view", "ensemble_kd.raycluster.setup_worker",
                   "ensemble_kd.raycluster.job_runtime_env"):
        assert callable(attr(dotted)), dotted
