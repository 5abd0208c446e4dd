"""Start-up hook, imported by ``torchtune_blah.pth`` in every Python process.

torchtune's CLI (``tune ls/cp/run``) only knows the recipes listed in
``torchtune._recipe_registry``. This module puts a one-shot finder at the front
of ``sys.meta_path``; when (and only when) torchtune imports that registry
module, the finder lets the normal import run and then calls
``torchtune_blah._registry.register`` on it.

Standard library only, and nothing imported up front: it runs at every
interpreter start. (wrapt's post-import hooks do the same job but cost 15-80 ms
to import here; this costs well under 1 ms. See benchmarks/startup_cost.py.)
"""

import sys

_REGISTRY_MODULE = "torchtune._recipe_registry"


class _RegisterAfterExec:
    """Loader proxy: execute the real module, then add our recipes to it."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from torchtune_blah._registry import register

        register(module)

    def __getattr__(self, name):  # get_source, get_code, ... for tracebacks
        return getattr(self._loader, name)


class _RegistryFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        # One shot: step aside so the lookup below finds the real module.
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


if _REGISTRY_MODULE not in sys.modules and not any(
    isinstance(f, _RegistryFinder) for f in sys.meta_path
):
    sys.meta_path.insert(0, _RegistryFinder())
