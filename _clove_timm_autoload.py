"""Register the CLoVE pretrained tags with timm in scripts that import only ``timm``.

A wheel install of clove_timm puts ``_clove_timm_autoload.pth`` into site-packages; at interpreter start-up it
runs ``import _clove_timm_autoload; _clove_timm_autoload.install()``, which puts one finder at the front of
``sys.meta_path``. The finder ignores every import except the top-level ``timm``; when ``timm`` finishes executing
it imports :mod:`clove_timm` (which registers ``resnet50.clove_in1k`` and friends) and removes itself. So
``python train.py --model resnet50.clove_in1k --pretrained`` with timm's own ``train.py`` works unchanged.

Cost when timm is never imported: importing this stdlib-only module once, and one string comparison per import.

Set ``CLOVE_TIMM_DISABLE_AUTOLOAD=1`` to turn the hook off (``import clove_timm`` still registers the tags).
The hook does not run with ``python -S`` (no site processing), and editable installs (``pip install -e``) do not
install the ``.pth`` file (setuptools' editable wheels only carry their own path hook); there, import clove_timm
explicitly.

This module must stay importable without timm, torch or clove_timm: it runs in every interpreter of the
environment.
"""

import os
import sys

DISABLE_ENV = "CLOVE_TIMM_DISABLE_AUTOLOAD"
PTH_FILENAME = "_clove_timm_autoload.pth"
PTH_LINE = "import _clove_timm_autoload; _clove_timm_autoload.install()\n"
"""The single line of the ``.pth`` file; site executes lines that start with ``import``."""

_TRUE = ("1", "true", "yes", "on")


def disabled() -> bool:
    """Whether ``$CLOVE_TIMM_DISABLE_AUTOLOAD`` turns the hook off."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in _TRUE


def _register_clove_tags() -> None:
    if "clove_timm" in sys.modules:
        # Either already registered, or clove_timm is itself importing timm right now and registers on return.
        return
    try:
        import clove_timm  # noqa: F401  (registers the tags)
    except Exception as error:  # a broken add-on must not break `import timm`
        import warnings  # not at module level: interpreter start-up does not import it

        warnings.warn(f"clove_timm could not register its pretrained tags with timm: {error!r}", stacklevel=2)


class _PostImportLoader:
    """Runs the original loader of ``timm``, then registers the CLoVE tags."""

    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # timm sees its real loader, as it would without the hook.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._finder.uninstall()
        _register_clove_tags()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class TimmPostImportFinder:
    """A ``sys.meta_path`` finder that only answers for the top-level ``timm`` package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PostImportLoader(spec.loader, self)
        return spec

    def uninstall(self) -> None:
        """Remove this finder from ``sys.meta_path`` (idempotent)."""
        while self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Install the finder, unless disabled or already installed; registers at once if timm is already imported."""
    if disabled():
        return
    if "timm" in sys.modules:
        _register_clove_tags()
        return
    if not any(isinstance(f, TimmPostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TimmPostImportFinder())
