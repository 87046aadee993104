"""Old import paths of the modules (and names) that moved into ``commands/`` and ``datasets/`` (0.2).

``import percontrast.train`` keeps working for one release: it returns the module at its
new path (the same object, so monkeypatching either name patches both) and warns with a
``DeprecationWarning`` that names the new path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {
    **{f"percontrast.{c}": f"percontrast.commands.{c}"
       for c in ("score", "train", "generate", "evaluate", "compare", "identify", "demo", "prepare")},
    "percontrast.benchmarks": "percontrast.datasets.longlamp",
    "percontrast.corpora": "percontrast.datasets.splits",
    "percontrast.corpora.email": "percontrast.datasets.email",
    "percontrast.corpora.sotu": "percontrast.datasets.sotu",
    "percontrast.synthetic": "percontrast.datasets.synthetic",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=name == "percontrast.corpora")

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path will be removed in the next release",
                      DeprecationWarning, stacklevel=3)
        target = importlib.import_module(new)
        if spec.name != "percontrast.corpora":
            return target
        # The old package also had submodules (corpora.email): a package that reads through to splits.
        pkg = types.ModuleType(spec.name, target.__doc__)
        pkg.__path__ = []
        pkg.__getattr__ = lambda attr: getattr(target, attr)
        return pkg

    def exec_module(self, module):
        pass   # the module at the new path is already executed


# Names that left a module that stayed: (module, name) -> new module.
MOVED_NAMES = {("percontrast.data", n): "percontrast.datasets" for n in ("load_records", "BUILTIN", "ASSETS")}


def _forward(module_name: str):
    def __getattr__(name: str):
        new = MOVED_NAMES.get((module_name, name))
        if new is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        warnings.warn(f"{module_name}.{name} moved to {new}.{name}; the old path will be removed in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)
    return __getattr__


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
    for module_name in {m for m, _ in MOVED_NAMES}:
        importlib.import_module(module_name).__getattr__ = _forward(module_name)
