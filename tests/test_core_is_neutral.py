"""metta_core must not import ray or torchrl (the bridges may)."""

import subprocess
import sys


def test_metta_core_imports_no_framework():
    code = (
        "import sys, metta_core, metta_core.advantage, metta_core.ppo, metta_core.training, metta_core.trainer, "
        "metta_core.runlog, metta_core.gym_env, bridges.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torchrl'))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"framework modules imported by the core: {out.stdout.strip()}"
