#!/usr/bin/env bash
# Regenerates the quality report: measures perplexity through the service on both models,
# calibrates per-(layer, K/V) sparsity for docs-byte-10m on windows 300 and 520 and measures
# the calibrated policies on windows 0+593, 150+450 and 8 more (about 110 minutes on 2 cores),
# then writes tests/eval/REPORT.md and its plots.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
server=${1:-$here/../../build/bin/sparsekv-server}
examples=$here/../../clients/python/examples
/usr/bin/python3 "$here/frontend_quality.py" --server-bin "$server" --docs-windows 2 \
  --docs-tokens 2048 --stories 16 --attribution \
  --json "$here/frontend_quality_results.json" --md "$here/frontend_quality_results.md"
# Calibration in two stages: single-layer curves and refinement on 768-token windows, then
# two more refinement rounds (moves of 6 entries) on the full 2048-token windows.
mkdir -p "$here/calibration"
cal=$here/calibration/docs-byte-10m.output_aware.json
short=$(mktemp --suffix=.json)
/usr/bin/python3 "$examples/calibrate_llama.py" --docs-windows 300,520 --tokens 768 \
  --scoring output_aware --targets 0.5,0.7 --refine 2 --out "$short"
/usr/bin/python3 "$examples/calibrate_llama.py" --docs-windows 300,520 --tokens 2048 \
  --scoring output_aware --targets 0.5,0.7 --curves-from "$short" --start "$short" \
  --reach 1 --refine 2 --out "$cal"
rm -f "$short"
for windows in 0,593 150,450; do
  /usr/bin/python3 "$here/frontend_quality.py" --server-bin "$server" --only docs-byte-10m \
    --docs-window-list "$windows" --docs-tokens 2048 --calibrated "$cal" \
    --json "$here/calibrated_results_${windows/,/_}.json" \
    --md "$here/calibrated_results_${windows/,/_}.md"
done
/usr/bin/python3 "$here/frontend_quality.py" --server-bin "$server" --only docs-byte-10m \
  --docs-window-list 37,111,185,259,333,407,481,555 --docs-tokens 2048 --calibrated "$cal" \
  --json "$here/calibrated_results_8windows.json" --md "$here/calibrated_results_8windows.md"
/usr/bin/python3 "$here/make_report.py"
