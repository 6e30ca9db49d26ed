"""Self-measurement tools, run from the repository's root as modules: python -m tools.bench,
python -m tools.compare, python -m tools.plan, python -m tools.gpu_check (bash tools/gpu_check.sh
runs the GPU checks). They may import anything; nothing imports them."""
