#!/bin/bash
# Run one protocol for several methods side by side on one GPU (ResNet-32 at batch 128 leaves most of
# an H100 idle, so five runs at once each keep 70-85% of their solo speed), for at most SECONDS.
# Every run checkpoints after each task, so calling this again resumes them; finished runs are read
# back. With $OUT set (the device tool's output folder), the run folders (metrics, logs, the latest
# checkpoint of each run) are copied there as runs.tgz, and the metrics alone as metrics.tgz.
#
#   benchmarks/side_by_side.sh tin32-gpu devdata/tiny-imagenet-32.tar.gz 560 icarl ssil der replay finetune
set -u
protocol=$1 root=$2 seconds=$3; shift 3
export PYTHONPATH=${PYTHONPATH:-src}
log=${OUT:-benchmarks/runs/$protocol}
mkdir -p "$log"
# decode the dataset once before the runs start, so they do not all unpack it at the same time
python - "$protocol" "$1" "$root" <<'PY' || exit 2
import sys
from cilkit.experiment import resolve
from cilkit.presets import load_yaml
from cilkit.data.registry import load_dataset
protocol, method, root = sys.argv[1:]
cfg = resolve([load_yaml(f"protocols/{protocol}/{method}"), {"data": {"root": root}}])
load_dataset(cfg.data.dataset, cfg.data.root)
PY
pids=""
for m in "$@"; do
  timeout "$seconds" python benchmarks/protocol.py "$protocol" --methods "$m" --data-root "$root" --device cuda > "$log/$m.log" 2>&1 &
  pids="$pids $!"
done
wait $pids
if [ -n "${OUT:-}" ]; then
  tmp=$(mktemp -d) && cp -r benchmarks/runs "$tmp/"
  find "$tmp/runs" -type d -name checkpoints | while read -r d; do ls "$d"/*.pt 2>/dev/null | sort | head -n -1 | xargs -r rm -f; done
  tar czf "$OUT/runs.tgz" -C "$tmp" runs
  (cd "$tmp" && tar czf "$OUT/metrics.tgz" $(find runs -name metrics.json -o -name 'summary*.json' -o -name log.txt -o -name config.yaml))
  rm -rf "$tmp"
fi
for m in "$@"; do echo "== $m"; tail -2 "$log/$m.log"; done
