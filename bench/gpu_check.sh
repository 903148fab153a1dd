#!/usr/bin/env bash
# The GPU check (issue 22), for a lent GPU machine with Python, torch and transformers but no
# Rust toolchain and no network:
#
#     bash bench/gpu_check.sh dist/lowband-*.whl path/to/lowband
#
# Installs the abi3 wheel offline into a directory of its own (on PYTHONPATH, beside the
# machine's torch and transformers; nothing else on the machine changes),
# makes a corpus from the Python standard library's own source (nothing downloaded), runs
# examples/torch/train_gpt2.py on CUDA with 2 sites sharing the GPU, and prints the loss and
# lowband's time per round on a site (copy out, encode, send, wait for the merge, decode, copy
# in). Unattended, bounded to 5 minutes. LOWBAND_GPU_CHECK_ALLOW_CPU=1 runs it without a GPU (to
# check the script itself on a CPU machine). Build the wheel and the binary as the README says.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: bash bench/gpu_check.sh WHEEL BINARY" >&2
  exit 2
fi
wheel=$(readlink -f "$1")
binary=$(readlink -f "$2")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d -t lowband-gpu-check-XXXXXX)
echo "gpu_check: working in $work"

[ -f "$wheel" ] || { echo "gpu_check: no wheel at $1" >&2; exit 2; }
[ -x "$binary" ] || chmod +x "$binary"
"$binary" --version

"$python" -m pip install --quiet --no-index --no-deps --target "$work/site" "$wheel"
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
"$python" - <<'PY'
import os, sys
import torch, transformers, lowband
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, lowband {lowband.__version__}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}")
elif os.environ.get("LOWBAND_GPU_CHECK_ALLOW_CPU") != "1":
    sys.exit("gpu_check: no CUDA device (this check is for a GPU machine; LOWBAND_GPU_CHECK_ALLOW_CPU=1 runs it on CPU)")
PY

# A corpus every machine has: the standard library's source, 4 MB of it.
"$python" - "$work/corpus.txt" <<'PY'
import pathlib, sys, sysconfig
out, total = open(sys.argv[1], "wb"), 0
for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
    data = path.read_bytes()
    out.write(data)
    total += len(data)
    if total > 4_000_000:
        break
print(f"corpus: {total} bytes of the standard library's source")
PY

LOWBAND_BIN="$binary" timeout 300 "$python" "$here/../examples/torch/train_gpt2.py" \
  --corpus "$work/corpus.txt" --sites 2 --strategy "${LOWBAND_GPU_CHECK_STRATEGY:-diloco@50}" \
  --steps "${LOWBAND_GPU_CHECK_STEPS:-500}" --seed 0 --config "$here/../configs/reference.toml" \
  --json "$work/out.json" --directory "$work/run" > "$work/example.log" 2>&1 || {
  echo "gpu_check: the example failed; its log:" >&2
  tail -50 "$work/example.log" >&2
  exit 1
}
"$python" - "$work/out.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"gpu_check: {r['strategy']} on {r['device']}, {r['sites']} sites, {r['steps']} steps, {r['params']:,} parameters")
print(f"  final validation loss {r['final_val_loss']:.4f} (training {r['final_train_loss']:.4f})")
print(f"  lowband's time per round on a site (median; copy out, encode, send, wait, decode, copy in): {r['sync_seconds_median']:.3f} s")
print(f"  inter-site bytes {r['inter_site_bytes']:,}, wall {r['wall_seconds']} s")
PY
