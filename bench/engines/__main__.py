"""Child entry point: `python -m bench.engines ENGINE SPEC.json`.

Prints one JSON line with the seconds spent in the engine's `run` (after interpreter start-up
and module imports); the harness times the whole process from outside as well.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

from bench.engines import BASELINES
from bench.engines.spec import Spec


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in BASELINES:
        print(f"usage: python -m bench.engines {{{','.join(BASELINES)}}} SPEC.json", file=sys.stderr)
        return 2
    spec = Spec.read(argv[1])
    module = importlib.import_module(BASELINES[argv[0]].module)
    started = time.perf_counter()
    module.run(spec)
    print(json.dumps({"in_process_seconds": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
