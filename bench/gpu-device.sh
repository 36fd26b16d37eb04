#!/usr/bin/env bash
# `make bench-gpu` on the lent GPU machine (one H200; its image has Python 3.12, torch 2.11, transformers 5.17
# and no registry): installs the carried wheels, puts the project's packages on PYTHONPATH, runs bench/gpu.py
# on a random-weights Qwen2.5-Omni-3B and copies bench/results/gpu.json, gpu.md and the log to $OUT.
#
# Here, first (../shared/notes/gpu.md, "Using the lent GPU machine"):
#     make models                  # the tiny checkpoint: the 3B model's config, tokenizer and processor
#     make bench-gpu-wheels        # = bench/gpu-device.sh --download-wheels: ~17 MB of cp312 wheels in .whl/
#   which runs
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl <each of WHEELS below>
#   and run `.venv/bin/python -m bench.gpu --quick` here (the same script on the tiny model, ~15 s).
#
# Then one call of the device tool (COMMIT: what `git rev-parse --short HEAD` prints here; the machine gets
# the working tree without .git). The generated gRPC code is carried although the in-process engine does not
# import it today, so a later import of it cannot break the run:
#     run(command="OMNIGATE_BENCH_COMMIT=COMMIT bash bench/gpu-device.sh",
#         carry=[".whl", "services/shared/omnigate/gateway", "services/shared/omnigate/worker",
#                "models/tiny-qwen2.5-omni"],
#         timeout_s=590)
#   Arguments after the script go to bench/gpu.py (`bash bench/gpu-device.sh --soak-seconds 60 --no-sdpa`,
#   `--size 7b`). The run stops itself after BENCH_GPU_TIMEOUT seconds (default 540, inside the call's 590)
#   with what it measured so far (gpu.json says "partial": true), so the files always come back: gpu.json,
#   gpu.md and gpu.log under the reply's files_at. A full run without the speech section took ~6-8 min of the
#   session's 15 min of device time, machine start included: leave room, or shorten it, before a second try.
#   The speech section (concurrency 1, 4, 8 and 8 requests one at a time; it runs after the text levels and
#   before the soak) adds an estimated 2-3 min, not yet measured on the GPU: `--soak-seconds 60` makes room,
#   `--no-speech` skips it, `--speech-levels 1,8` shortens it.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the worker needs in-process beyond the machine's image (pinned to this project's .venv versions).
WHEELS=(
  transformers==5.23.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  pydantic-settings==2.16.3
  python-dotenv==1.2.4
  typing-inspection==0.4.5
  annotated-types==0.8.0
  typing-extensions==4.16.0
  opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  regex==2026.11.19
)

if [[ "${1:-}" == "--download-wheels" ]]; then
  # Here, not on the GPU machine: fetch the wheels for its Python (3.12, x86-64 manylinux).
  mkdir -p .whl
  exec "${PY:-.venv/bin/python}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"
fi

if [[ -z "${OUT:-}" ]]; then
  echo "gpu-device.sh runs on the lent GPU machine (the device tool sets OUT); here, run make bench-gpu" >&2
  exit 2
fi
if ! compgen -G ".whl/*.whl" >/dev/null; then
  echo "no wheels in .whl/: run make bench-gpu-wheels here and name .whl in the run's carry" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit
export PYTHONPATH="/tmp/site:$PWD/services/shared:$PWD/services/worker${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

mkdir -p bench/results
timeout --signal=INT --kill-after=20 "${BENCH_GPU_TIMEOUT:-540}" \
  python3 -m bench.gpu --size 3b --out-dir bench/results "$@" 2>&1 | tee "$OUT/gpu.log"
status=${PIPESTATUS[0]}
cp bench/results/gpu.json bench/results/gpu.md "$OUT"/ 2>/dev/null
echo "gpu-device.sh: bench/gpu.py exited with $status"
exit "$status"
