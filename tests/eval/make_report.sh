#!/usr/bin/env bash
# Regenerates the quality report: measures perplexity through the service on both models
# (about 35 minutes on 2 cores), then writes tests/eval/REPORT.md and its plots.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
server=${1:-$here/../../build/bin/sparsekv-server}
/usr/bin/python3 "$here/frontend_quality.py" --server-bin "$server" --docs-windows 2 \
  --docs-tokens 2048 --stories 16 --attribution \
  --json "$here/frontend_quality_results.json" --md "$here/frontend_quality_results.md"
/usr/bin/python3 "$here/frontend_quality.py" --server-bin "$server" --only docs-byte-10m \
  --docs-windows 2 --docs-tokens 2048 --allocation \
  --json "$here/allocation_results.json" --md "$here/allocation_results.md"
/usr/bin/python3 "$here/frontend_quality.py" --server-bin "$server" --only docs-byte-10m \
  --docs-window-list 150,450 --docs-tokens 2048 --allocation \
  --json "$here/allocation_heldout_results.json" --md "$here/allocation_heldout_results.md"
/usr/bin/python3 "$here/make_report.py"
