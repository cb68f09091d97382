"""Run the sidecar benchmark from a checkout: ``python benchmarks/run.py [options]``.

Same as ``sidecar bench [options]``; see benchmarks/README.md.
"""

import sys

from sidecar_core._bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
