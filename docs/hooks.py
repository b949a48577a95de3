"""MkDocs hook: the build fails when a public name of picopool has no docstring.

mkdocstrings renders what is there; this makes a missing docstring an error under
``mkdocs build --strict`` (which CI runs).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

PUBLIC_MODULES = ("picopool", "picopool.discovery", "picopool.strategies",
                  "picopool.sqlalchemy", "picopool.cluster")


def missing_docstrings() -> list[str]:
    missing = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        if not inspect.getdoc(module):
            missing.append(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not obj.__doc__:
                missing.append(f"{name}.{attr}")
    return missing


def on_pre_build(config: Any, **kwargs: Any) -> None:
    missing = missing_docstrings()
    if missing:
        raise SystemExit(f"public names without a docstring: {', '.join(missing)}")
