#!/usr/bin/env bash
# Builds the API reference from the docstrings into build/api/ (Sphinx autodoc + napoleon).
# Any docutils or cross-reference warning fails the build (-W -n, all reported first).
# Usage: bash docs/build_api.sh   (PYTHON=... to pick the interpreter; default: python)
set -euo pipefail
cd "$(dirname "$0")/.."
# -E: read every source again, so warnings of unchanged files are reported every time.
"${PYTHON:-python}" -m sphinx -b html -E -W --keep-going -n -q docs/api build/api
echo "API reference: build/api/index.html"
