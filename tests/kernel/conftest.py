"""Kernel tests run real kernels (User-Mode-Linux nodes); see tests/kernel/harness/."""

import os
import sys

# make "from tests.kernel.harness import Fleet" work however pytest was started
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
