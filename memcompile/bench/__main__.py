"""`python -m memcompile.bench`: the entry of a worker and of the bench without the CLI.

    python -m memcompile.bench --worker SPEC_JSON     # one configuration (what launch starts)
    python -m memcompile.bench --model tiny --seq-lens 32,64 --out bench_out   # = memcompile bench
"""

import sys

from memcompile.bench.launch import main

if __name__ == "__main__":
    sys.exit(main())
