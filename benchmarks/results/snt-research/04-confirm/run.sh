#!/usr/bin/env bash
# The confirmation (see README.md here): both studies, one thread per process.
# Start it twice, in two shells, for the two cores: the processes share each study run by run,
# and the last to finish a study writes its report.
#   . .venv/bin/activate && bash benchmarks/results/snt-research/04-confirm/run.sh
# The studies' folders are beside this script (their stage results are committed as runs finish; a later session
# resumes them). A process that finds the last smallvgg runs held by the other goes on to resnet8;
# study-resnet8.toml is written once 03-adam-curve's resnet8 curve has set its epochs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
export OMP_NUM_THREADS=1
sntfx study --config "$here/study-smallvgg.toml" --out "$out/smallvgg"
sntfx study --config "$here/study-resnet8.toml" --out "$out/resnet8"
