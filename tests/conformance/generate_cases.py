"""Regenerate the canonical conformance cases in tests/conformance/cases (deterministic).

    python tests/conformance/generate_cases.py            # every case
    python tests/conformance/generate_cases.py horizon_2  # some cases

The expected values come from bridges/conformance/reference.py (a separate re-statement of
SPEC §1-§4), never from metta_core. Regenerating with unchanged code gives identical bytes.
"""

import sys

from bridges.conformance.cases import CASES_DIR, generate

if __name__ == "__main__":
    for path in generate(CASES_DIR, sys.argv[1:] or None):
        print(path)
