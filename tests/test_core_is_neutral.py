"""metta_core must not import ray or torchrl (the bridges may)."""

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
import metta_core
modules = [m.name for m in pkgutil.walk_packages(metta_core.__path__, "metta_core.")]
for name in modules:
    importlib.import_module(name)
import bridges.cli  # the CLI's train command for the core must stay framework-free too
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torchrl'))
print(len(modules), ','.join(bad))
"""


def test_metta_core_imports_no_framework():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    count, _, bad = out.stdout.strip().partition(" ")
    assert int(count) >= 14, f"only {count} metta_core modules found: is the package importable?"
    assert bad == "", f"framework modules imported by the core: {bad}"
