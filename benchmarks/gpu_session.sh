#!/usr/bin/env bash
# One stage of the GPU checks, for a lent GPU machine (the device tool) or any CUDA box.
#
#   bash benchmarks/gpu_session.sh check      # FIRST: seg4diff-fast check, every backend x dtype x capture mode on
#                                             # the SD3 and Flux shapes: correct? how fast against SDPA? (check.json)
#   bash benchmarks/gpu_session.sh test       # compiled test suite (one pinned kernel config), ~5 min
#   bash benchmarks/gpu_session.sh sanitize   # compute-sanitizer memcheck of the kernel at odd shapes
#   bash benchmarks/gpu_session.sh kernel     # kernel benchmark matrix, SD3-medium then Flux.1-dev shapes
#   bash benchmarks/gpu_session.sh e2e        # full-size transformers, capture vs full-map, VAE encode
#
# Logs and result files go to $OUT (default /tmp/seg4diff-gpu). The GPU image has torch and triton but no
# diffusers: put its wheel in .whl/ first (see /work/.library/device/README.md) and carry .whl; every wheel
# found there is installed to /tmp/site. Results JSON files are raw: commit them unedited under
# benchmarks/results/ (run.py --merge joins the stages into one <device>-<date>.json).
set -uo pipefail
stage=${1:?usage: gpu_session.sh check|test|sanitize|kernel|e2e}
OUT=${OUT:-/tmp/seg4diff-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package itself, without its dependencies (nothing can be fetched there).
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/s4d . || exit 1
export PYTHONPATH=/tmp/s4d:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null; date -u +%FT%TZ; } | tee "$OUT/env.txt"

case "$stage" in
  check)
    # exit code 1 when a backend fails (the JSON is written either way); check.json has its own schema
    # (seg4diff_fast.selfcheck: env, settings, rows, verdict), so run.py --merge leaves it out: commit it beside
    # the merged file, as benchmarks/results/<device>-<date>-check.json
    python3 -m seg4diff_fast.cli check --model sd3,flux --json "$OUT/check.json" 2>&1 | tee "$OUT/check.log"
    ;;
  test)
    SEG4DIFF_AUTOTUNE=0 python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log"
    ;;
  sanitize)
    compute-sanitizer --tool memcheck --leak-check full --error-exitcode 1 python3 - <<'PY' 2>&1 | tee "$OUT/memcheck.log"
import os
os.environ["SEG4DIFF_AUTOTUNE"] = "0"
import torch
from seg4diff_fast import joint_attention
for (b, h, n_txt, n_img, d, first) in [(1, 2, 333, 250, 64, False), (2, 3, 77, 129, 72, True), (1, 1, 1, 16, 8, True),
                                         (1, 2, 154, 1000, 128, False), (1, 1, 7, 100, 256, True)]:
    n = n_txt + n_img
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(3))
    ts = slice(0, n_txt) if first else slice(n_img, n)
    for capture, heads in [("both", "all"), ("both", "mean"), ("i2t", "mean"), (None, "mean")]:
        joint_attention(q, k, v, ts, capture=capture, heads=heads, text_index=torch.arange(0, n_txt, 2, device="cuda"),
                        backend="triton")
torch.cuda.synchronize()
print("memcheck cases done")
PY
    ;;
  kernel)
    python3 benchmarks/run.py --suite kernel --models sd3-medium --out "$OUT/kernel-sd3.json" 2>&1 | tee "$OUT/kernel-sd3.log"
    python3 benchmarks/run.py --suite kernel --models flux1-dev --out "$OUT/kernel-flux.json" 2>&1 | tee "$OUT/kernel-flux.log"
    ;;
  e2e)
    python3 benchmarks/run.py --suite e2e --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
