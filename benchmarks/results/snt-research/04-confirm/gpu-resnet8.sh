#!/usr/bin/env bash
# The resnet8 confirmation on a lent GPU (README.md here: amendment of 2026-12-01 02:45 UTC).
#
# Run by the device tool from the repository root, in one call (device time is 15 minutes a session):
#   run(command="bash benchmarks/results/snt-research/04-confirm/gpu-resnet8.sh 480 10",
#       carry=[".gpu", ".whl"], timeout_s=560)
# after preparing, in this checkout (both folders are in .git/info/exclude):
#   .gpu/: git archive --format=tar.gz -o .gpu/code-d3171f9.tar.gz d3171f9 -- sntfx passes exporters pyproject.toml README.md
#          and the four Fashion-MNIST IDX .gz files (cp /usr/share/datasets/fashion-mnist/*.gz .gpu/)
#   .whl/: what sntfx needs that the device image lacks, for Python 3.12 (torch-pruning, jsonschema,
#          jsonschema-specifications, referencing, rpds-py; see /work/.library/device/README.md)
# and, to resume a study a previous lease left part-way, the files it returned, copied into .gpu/
# (resnet8-results.tar.gz and any resnet8-resume.tar.partNN).
#
# Every run trains with the code of commit d3171f9 (the confirmation's pin), on the GPU, all five methods
# (study-resnet8-gpu.toml). PROCESSES study processes share the folder run by run (one thread each for
# data loading); after SECONDS they are stopped: finished runs keep their stage results, a run in progress
# keeps its last epoch's checkpoint. What comes back: $OUT/resnet8-results.tar.gz (the stage results, to
# unpack into resnet8-gpu/ here and commit) and $OUT/resnet8-resume.tar.partNN (checkpoints, for the next lease).
# Only errors are printed: the logs hold validation accuracies, which nobody reads before the choice.
set -uo pipefail
seconds=${1:-480}
procs=${2:-10}
here=benchmarks/results/snt-research/04-confirm
out=${OUT:-/tmp/gpu-out}
config=${GPU_STUDY_CONFIG:-$here/study-resnet8-gpu.toml}
study=/tmp/resnet8-gpu
mkdir -p "$out" "$study" /tmp/code
start=$(date +%s)

if [ -z "${GPU_DRY_RUN:-}" ]; then  # on the device: install what the image lacks, and the data
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    mkdir -p /usr/share/datasets/fashion-mnist && cp .gpu/*-ubyte.gz /usr/share/datasets/fashion-mnist/
fi
if [ -f .gpu/resnet8-results.tar.gz ]; then  # a study a previous lease left part-way
    tar -xzf .gpu/resnet8-results.tar.gz -C "$study"
    if ls .gpu/resnet8-resume.tar.part* > /dev/null 2>&1; then
        cat .gpu/resnet8-resume.tar.part* | tar -xf - -C "$study"
    fi
    find "$study" -name .lock -delete
fi
tar -xzf .gpu/code-d3171f9.tar.gz -C /tmp/code
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --target /tmp/sntfx /tmp/code > /tmp/sntfx-install.log 2>&1; then
    # no build backend there: lay the package out as pyproject.toml's package-dir does
    tail -5 /tmp/sntfx-install.log; echo "pip could not build the pinned code; copying its package layout instead"
    rm -rf /tmp/sntfx && mkdir -p /tmp/sntfx && cp -r /tmp/code/sntfx /tmp/sntfx/ \
        && cp -r /tmp/code/passes /tmp/sntfx/sntfx/passes && cp -r /tmp/code/exporters /tmp/sntfx/sntfx/exporters \
        || exit 1
fi
export PYTHONPATH=/tmp/sntfx:/tmp/site
config=$(realpath "$config")
cd /tmp  # not the checkout's root: its sntfx/ folder would shadow the pinned code
python3 - <<'PY' || exit 1
import sys
import sntfx, torch
if not sntfx.__file__.startswith("/tmp/sntfx/"):
    sys.exit(f"sntfx comes from {sntfx.__file__}, not the pinned code in /tmp/sntfx")
print("sntfx from", sntfx.__file__, "| torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
echo "setup took $(( $(date +%s) - start )) s; $procs processes for $seconds s"

for i in $(seq "$procs"); do
    OMP_NUM_THREADS=1 timeout -s TERM "$seconds" python3 -m sntfx study --config "$config" --out "$study" \
        > "/tmp/study-$i.log" 2>&1 &
    sleep 2  # staggered: each takes the next free run
done
wait
echo "studies ended after $(( $(date +%s) - start )) s"

# What finished, counted without reading any metric; and which checkpoints go back (smallest first, at most
# 20 MiB: files come back up to 16 MiB each, and the next call's tree, which carries them with the 30 MB of
# data, travels up to 64 MiB); a part-trained run left out trains again.
python3 - "$study" > /tmp/resume.list <<'PY'
import sys
from pathlib import Path

root = Path(sys.argv[1])
runs = sorted(p.parent for p in root.glob("runs/*/*/seed*/config.json"))
done = [r for r in runs if (r / "sweep.val.json").exists() and (r / "evaluate.val.json").exists()]
part = [r for r in runs if (r / "train.ckpt").exists() and r not in done]
print(f"{len(done)} of {len(runs)} runs measured; {len(part)} part-trained:",
      ", ".join(f"{r.parent.name}/{r.name}" for r in part), file=sys.stderr)
print("report written" if (root / "results.json").exists() else "no report yet", file=sys.stderr)
total = 0
for run in sorted(part, key=lambda r: (r / "train.ckpt").stat().st_size):
    size = (run / "train.ckpt").stat().st_size
    if total + size > 20 * 2**20:
        break
    total += size
    print((run / "train.ckpt").relative_to(root))
PY
grep -h -B2 -A12 "Traceback\|Error:" /tmp/study-*.log | grep -v -i "accuracy" | head -60
find "$study" -name .lock -delete
(cd "$study" && tar -czf "$out/resnet8-results.tar.gz" --exclude=model.pt --exclude=train.ckpt .)
if [ -s /tmp/resume.list ]; then
    (cd "$study" && tar -cf - -T /tmp/resume.list) | split -b 15M -d - "$out/resnet8-resume.tar.part"
fi
echo "checkpoints kept for the next lease: $(wc -l < /tmp/resume.list)"
ls -la "$out"
