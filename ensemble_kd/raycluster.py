"""Alias of :mod:`ensemble_kd.core.raycluster`, the module's home since the package was grouped into
folders (issue 23). The docs name this old path for library use, so ``import ensemble_kd.raycluster`` and
``from ensemble_kd.raycluster import ...`` keep working and give the very same module object (a
monkeypatch or a Ray hook string through either path reaches the one module). New code imports
``ensemble_kd.core.raycluster``; an import-linter contract keeps the package's own modules off this path."""
import sys

from ensemble_kd.core import raycluster as _module

sys.modules[__name__] = _module
