"""One importable copy of each module, found by the tools that read the source.

core/, backends/ and renderers/ sit at the top of the repository and are importable only as
layerscope.core, layerscope.backends and layerscope.renderers (through the links in
layerscope/). Editors and type checkers must follow those imports to the real files, and a
module added to one of the folders must be importable at once, without a reinstall.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import uuid
from pathlib import Path

import jedi
import pytest

import layerscope
from layerscope.backends.base import Backend
from layerscope.core.writer import TraceWriter
from layerscope.renderers import attention

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("core", "backends", "renderers")


@pytest.mark.parametrize("name", FOLDERS)
def test_top_level_folders_are_not_packages_in_the_test_process(name: str) -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


def test_one_error_hierarchy() -> None:
    from layerscope.core import StoreError

    assert issubclass(StoreError, layerscope.LayerscopeError)
    assert not any(name.split(".")[0] in FOLDERS for name in sys.modules)


@pytest.mark.parametrize("name", FOLDERS)
def test_package_links_point_at_the_top_level_folders(name: str) -> None:
    link = ROOT / "layerscope" / name
    assert link.is_symlink() and link.resolve() == ROOT / name
    module = importlib.import_module(f"layerscope.{name}")
    assert Path(module.__file__ or "").resolve() == ROOT / name / "__init__.py"


@pytest.mark.parametrize(("code", "target"), [
    ("from layerscope.core.writer import TraceWriter\nTraceWriter", TraceWriter),
    ("from layerscope.backends.base import Backend\nBackend", Backend),
    ("import layerscope.renderers.attention\nlayerscope.renderers.attention", attention),
])
def test_editor_goto_definition_reaches_the_source_file(code: str, target: object) -> None:
    """What an editor's go-to-definition does (jedi, with the test environment)."""
    project = jedi.Project(ROOT, environment_path=sys.prefix)
    script = jedi.Script(code, path=ROOT / "scratch.py", project=project)
    last = code.splitlines()[-1]
    names = script.goto(2, len(last) - 1, follow_imports=True)
    assert names, f"jedi found no definition for {last}"
    source = Path(inspect.getfile(target)).resolve()  # type: ignore[arg-type]
    assert Path(str(names[0].module_path)).resolve() == source
    if inspect.isclass(target):  # the class statement itself (decorators stand above it)
        line = source.read_text().splitlines()[names[0].line - 1]
        assert line.startswith(f"class {target.__name__}")


def test_new_module_is_importable_without_reinstalling(tmp_path: Path) -> None:
    name = f"_probe_{uuid.uuid4().hex[:8]}"
    module = ROOT / "core" / f"{name}.py"
    module.write_text("VALUE = 42\n")
    try:
        out = subprocess.run(
            [sys.executable, "-P", "-c", f"import layerscope.core.{name} as m; print(m.VALUE)"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
    finally:
        module.unlink()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"


def test_tracing_a_module_target_leaves_sys_path_as_it_was(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`layerscope trace module:factory` imports from the working directory (the repository
    root, in this test) without leaving it on sys.path, where it would expose core/."""
    from layerscope.cli import main

    before = list(sys.path)
    assert main(["trace", "no_such_module_xyz:make", "-o", str(tmp_path / "a.zarr")]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert sys.path == before
