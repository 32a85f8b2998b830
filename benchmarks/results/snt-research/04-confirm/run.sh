#!/usr/bin/env bash
# The confirmation (see README.md here): both studies, one thread per process.
# Start it twice, in two shells, for the two cores: the processes share each study run by run,
# and the last to finish a study writes its report.
#   . .venv/bin/activate && bash benchmarks/results/snt-research/04-confirm/run.sh OUT
# (a process that finds the last smallvgg runs held by the other goes on to resnet20; study-resnet20.toml is
# written once 03-adam-curve's resnet20 curve has set its epochs)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: run.sh OUT  (the folder that holds the two studies)}
mkdir -p "$out"
export OMP_NUM_THREADS=1
sntfx study --config "$here/study-smallvgg.toml" --out "$out/smallvgg"
sntfx study --config "$here/study-resnet20.toml" --out "$out/resnet20"
