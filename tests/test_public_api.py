"""`clipengine`'s public API: every name resolves to the object its module defines, and importing the
package costs nothing until a name is used (torch takes seconds to import)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import clipengine


def test_every_public_name_is_its_modules_object():
    names = [n for n in clipengine.__all__ if n != "__version__"]
    assert names and len(names) == len(set(names))
    for name in names:
        module = importlib.import_module(clipengine._PUBLIC[name])
        assert getattr(clipengine, name) is getattr(module, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        clipengine.nope  # noqa: B018


def test_importing_the_package_loads_nothing_heavy():
    code = ("import sys, clipengine; heavy = [m for m in ('torch', 'open_clip', 'faiss', 'numpy', 'PIL') "
            "if m in sys.modules]; print(heavy); clipengine.ModelSpec; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"  # nothing heavy on import
    assert out[1] == "False"  # ModelSpec's module keeps torch lazy too: a cold search stays torch-free
