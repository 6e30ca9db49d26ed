"""Moved: this tool is now tools/compare.py, run as `python -m tools.compare` (README.md, Layout)."""
import sys

sys.exit("compare.py moved to tools/compare.py: run `python -m tools.compare " + " ".join(sys.argv[1:]) + "` (README.md, Layout)")
