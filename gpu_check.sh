#!/usr/bin/env bash
# Moved: the GPU checks are now tools/gpu_check.sh (README.md, Layout).
echo "gpu_check.sh moved to tools/gpu_check.sh: run \`bash tools/gpu_check.sh\` (SECTIONS as before)" >&2
exit 2
