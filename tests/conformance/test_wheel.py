"""The golden cases ship in the wheel: a non-editable install runs ``metta-bridges conformance`` anywhere.

The wheel is built from a copy of the sources and installed with ``--no-deps`` into a fresh venv
whose only link to the dev environment is a ``.pth`` line naming the dev venv's site-packages
(for torch, TorchRL, Ray, ...). A plain path line does not run the ``.pth`` files found there, so
the dev venv's editable finder stays off and the fresh venv imports the wheel's copy of the
package (checked), from a folder that has no checkout in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "metta_core", "bridges")


def _run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_non_editable_wheel_runs_conformance_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["MPLBACKEND"] = "Agg"
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", wheels, source], tmp_path, env)
    (wheel,) = wheels.glob("metta_bridges-*.whl")

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         tmp_path, env)
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, env).stdout.strip())
    (purelib / "dev_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    located = _run([python, "-c", "import bridges, bridges.conformance.cases as c; print(bridges.__file__); "
                    "print(c.CASES_DIR)"], elsewhere, env).stdout.split()
    assert all(Path(p).is_relative_to(purelib) for p in located), located  # the wheel's copy, not the checkout
    assert (Path(located[1]) / "README.md").is_file() and len(list(Path(located[1]).glob("*.npz"))) >= 20

    result = _run([fresh / "bin" / "metta-bridges", "conformance", "--no-progress"], elsewhere, env)
    rows = [line for line in result.stdout.splitlines() if line.rstrip().endswith(("PASS", "FAIL", "ERROR"))]
    assert rows and all(line.rstrip().endswith("PASS") for line in rows), result.stdout
    assert {"core", "torchrl", "rllib"} <= {line.split()[1] for line in rows}
    assert (elsewhere / "runs" / "conformance" / "report.json").is_file()
