"""Tests that run Triton kernels on the CPU in Triton's interpreter. Triton reads
TRITON_INTERPRET when it is imported, so these run in a process of their own that sets it
from the start (tests/test_split_kv.py starts it); any other pytest run skips them."""

import os

collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["test_*.py"]
