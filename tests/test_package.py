"""The library's import contract."""

from __future__ import annotations

import json
import subprocess
import sys


def test_import_clove_timm_pulls_in_neither_accelerate_nor_the_recipe():
    code = (
        "import json, sys; import clove_timm; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'accelerate', 'training', 'hub'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_public_modules_import_and_export_their_names():
    import clove_timm.heads
    import clove_timm.loss
    import clove_timm.matching
    import clove_timm.model
    import clove_timm.monitor

    for module in (clove_timm.heads, clove_timm.loss, clove_timm.matching, clove_timm.model, clove_timm.monitor):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.__all__ names {name!r}, which it does not define"
