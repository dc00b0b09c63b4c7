#!/usr/bin/env bash
# The Triton path on a lent GPU, in one call: correctness, then speed vs cuBLAS (batch 1, bf16).
# Run from the repository root on a CUDA machine whose python3 has torch and triton (the
# device image has both, and pluggy/networkx/safetensors/pyyaml/tqdm/filelock/ninja), e.g.
#   run(command="bash bench/gpu.sh", timeout_s=540)
# sparsec is installed (no dependencies, no network) into /tmp/sparsec-site so that its entry
# points, backend="sparsec" among them, are found. Results: stdout and $OUT/gpu_bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/sparsec-site . >/dev/null
export PYTHONPATH=/tmp/sparsec-site${PYTHONPATH:+:$PYTHONPATH}
cd /tmp  # import the installed copy, not the source folders
python3 -c "import torch, triton, sparsec; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
python3 "$OLDPWD/bench/gpu_check.py" "${OUT:-/tmp}/gpu_bench.json"
