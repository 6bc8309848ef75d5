"""`import layerscope` must not import any framework: frameworks load only when used."""

import json
import subprocess
import sys


def test_import_loads_no_framework():
    code = (
        "import sys, json, layerscope, layerscope.cli, layerscope.backends, layerscope.renderers;"
        "layerscope.cli.build_parser();"
        "print(json.dumps([m for m in ('torch', 'tensorflow', 'jax', 'flax', 'keras')"
        " if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_package_installs_only_layerscope():
    import layerscope.backends
    import layerscope.core
    import layerscope.renderers

    for module in (layerscope.core, layerscope.backends, layerscope.renderers):
        assert module.__name__.startswith("layerscope.")
    assert "core" not in sys.modules and "backends" not in sys.modules
