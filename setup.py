"""Build hook only; the project metadata lives in pyproject.toml.

Adds ``_clove_timm_autoload.pth`` to the root of the wheel (site-packages once installed), so that scripts which
import only ``timm`` see the CLoVE pretrained tags. What the file does and how to turn it off: see
``_clove_timm_autoload.py``. setuptools has no declarative option for a file at the wheel root, hence this command.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_HERE = Path(__file__).resolve().parent


def _autoload_module():
    # Load by path: the build environment does not put the project on sys.path.
    spec = importlib.util.spec_from_file_location("_clove_timm_autoload", _HERE / "_clove_timm_autoload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithAutoload(build_py):
    """``build_py`` that also writes the autoload ``.pth`` file next to the top-level packages."""

    def run(self):
        super().run()
        autoload = _autoload_module()
        self.mkpath(self.build_lib)
        (Path(self.build_lib) / autoload.PTH_FILENAME).write_text(autoload.PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode=True):
        pth = str(Path(self.build_lib) / _autoload_module().PTH_FILENAME)
        return [*super().get_outputs(include_bytecode), pth]


setup(cmdclass={"build_py": BuildPyWithAutoload})
