#!/usr/bin/env bash
# The confirmation's last steps, fixed before resnet8's runs are done (README.md here, "Finishing"):
#   1. both folders hold their validation reports;
#   2. the choice, on validation: choose_default.py on both models' results (the default style and the goal test);
#   3. resnet8's planning and mechanism figures, on validation: power.py and mechanism.py;
#   4. the one reading of the test split: both study folders run again with evaluate_on = "test", which only collects
#      the sealed STAGE.json files; the validation report stays results.json / report.md / plots/, the test one
#      is moved beside it as results.test.json / report.test.md / plots-test/ (and study.test.json);
#   5. the closing table from the test files, choosing nothing: final_table.py, the default of step 2 marked,
#      kept as final.test.md.
# Run from the repository root once all 15 resnet8 runs are done and its validation report is written:
#   bash benchmarks/results/snt-research/04-confirm/finish.sh [STUDY_VENV]
# STUDY_VENV: the virtual environment the runs trained with (a worktree at d3171f9, see README.md), used for the
# test collection so that the sealed files' stage settings are the ones it expects; the analysis scripts run with
# this checkout's .venv. It stops before step 4 if any run lacks a sealed file (the study would otherwise measure,
# or train, again).
set -euo pipefail
here=${CONFIRM_DIR:-benchmarks/results/snt-research/04-confirm}  # another folder of the same layout: a dry run
study_venv=${1:-../wt-run/.venv}
py=.venv/bin/python
steps=benchmarks/results/train-step/cpu-confirm-candidates.json

# 1. both reports are there, of all their runs
for model in smallvgg resnet8; do
    [ -f "$here/$model/results.json" ] || { echo "$here/$model/results.json missing: the study is not finished" >&2; exit 2; }
done
"$py" - "$here" <<'EOF'
import json, sys
from pathlib import Path
here = Path(sys.argv[1])
for model in ("smallvgg", "resnet8"):
    r = json.loads((here / model / "results.json").read_text())
    c = r["config"]
    runs = len(c["models"]) * len(c["methods"]) * len(c["seeds"])
    if c.get("evaluate_on") != "val" or len(r["runs"]) != runs:
        sys.exit(f"{model}/results.json: expected the validation report of its {runs} runs; "
                 f"found {c.get('evaluate_on')} with {len(r['runs'])}")
EOF

# 2-3. on validation
"$py" benchmarks/choose_default.py "$here/smallvgg/results.json" "$here/resnet8/results.json" --step-costs "$steps" \
    | tee "$here/choice.md"
"$py" benchmarks/power.py "$here/resnet8/results.json" --out "$here/power-resnet8.json" > "$here/power-resnet8.md"
"$py" benchmarks/mechanism.py "$here/resnet8/results.json" --out "$here/mechanism-resnet8" > /dev/null

# 4. the test split, read once: every run must have its sealed files (checked by name only)
missing=$(for run in "$here"/smallvgg/runs/*/*/seed* "$here"/resnet8/runs/*/*/seed*; do
    for stage in evaluate sweep; do [ -f "$run/$stage.json" ] || echo "$run/$stage.json"; done
done)
if [ -n "$missing" ]; then
    echo "sealed test files missing, not collecting:" >&2
    echo "$missing" >&2
    exit 2
fi
for model in smallvgg resnet8; do
    dir="$here/$model"
    mkdir -p "$dir/.val"
    cp -p "$dir/results.json" "$dir/report.md" "$dir/study.json" "$dir/.val/"
    cp -rp "$dir/plots" "$dir/.val/plots"
    # the study measures nothing here: a run with its sealed files is complete; the timeout stops one that is not
    OMP_NUM_THREADS=1 timeout 1800 "$study_venv/bin/sntfx" study --config "$here/study-$model.toml" --out "$dir" \
        --evaluate-on test --no-seal-test > /dev/null \
        || { echo "$model: the test collection failed; the validation report's copy is in $dir/.val/" >&2; exit 1; }
    mv "$dir/results.json" "$dir/results.test.json"
    sed 's#(plots/#(plots-test/#g' "$dir/report.md" > "$dir/report.test.md" && rm "$dir/report.md"
    rm -rf "$dir/plots-test" && mv "$dir/plots" "$dir/plots-test"
    mv "$dir/study.json" "$dir/study.test.json"
    mv "$dir/.val/results.json" "$dir/.val/report.md" "$dir/.val/study.json" "$dir/" && mv "$dir/.val/plots" "$dir/plots" && rmdir "$dir/.val"
    echo "wrote $dir/results.test.json, report.test.md and plots-test/ (test split); the validation report is unchanged"
done

# 5. the closing table, from the test files just collected; the default is the one step 2 chose on validation
default=$(sed -n 's/^default: \([^ ]*\) .*/\1/p' "$here/choice.md")
[ "$default" != none ] || default=""  # choose_default.py prints "default: none (...)" when no candidate may be it
"$py" benchmarks/final_table.py "$here/smallvgg/results.test.json" "$here/resnet8/results.test.json" \
    --step-costs "$steps" ${default:+--default "$default"} > "$here/final.test.md"
echo "wrote $here/final.test.md (the closing table, test split; default: ${default:-none})"
