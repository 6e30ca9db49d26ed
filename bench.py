"""Moved: this tool is now tools/bench.py, run as `python -m tools.bench` (README.md, Layout)."""
import sys

sys.exit("bench.py moved to tools/bench.py: run `python -m tools.bench " + " ".join(sys.argv[1:]) + "` (README.md, Layout)")
