"""Imported first by the forkserver (its preload), before pyarrow: Arrow picks its default
memory pool once, from ARROW_DEFAULT_MEMORY_POOL, so the workers forked from the server
allocate with jemalloc. Measured on the budget's three data shapes (tests/test_budget.py),
the tree above idle fell from 2.0-2.4, 2.0-2.2 and 11-13 x memory_limit to 1.3-1.5, 0.7-0.9
and 2.2-3.6 x with jemalloc returning freed pages at once (worker.py, allocator_at_once.py):
mimalloc keeps freed pages for reuse, which the budget counts as held. A user's own choice in
the environment stands."""

import os
import sys

if sys.platform == "linux":  # where pyarrow's wheels have jemalloc
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
