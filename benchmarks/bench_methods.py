"""Seconds per training step of every registered method vs the compute floor (same run, same batch).

    python benchmarks/bench_methods.py [--device cuda] [--methods kd,dkd] [--steps 20]

Thin wrapper over ``kdzoo bench`` so the benchmark lives with the others; see kdzoo/bench.py.
"""

import sys

from kdzoo.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
