"""Alias of :mod:`ensemble_kd.orchestration.checks`, the module's home since the package was grouped into
folders (issue 23). The docs name this old path for library use, so ``import ensemble_kd.checks`` and
``from ensemble_kd.checks import ...`` keep working and give the very same module object (a
monkeypatch or a Ray hook string through either path reaches the one module). New code imports
``ensemble_kd.orchestration.checks``; an import-linter contract keeps the package's own modules off this path."""
import sys

from ensemble_kd.orchestration import checks as _module

sys.modules[__name__] = _module
