"""Moved: this tool is now tools/plan.py, run as `python -m tools.plan` (README.md, Layout)."""
import sys

sys.exit("plan.py moved to tools/plan.py: run `python -m tools.plan " + " ".join(sys.argv[1:]) + "` (README.md, Layout)")
