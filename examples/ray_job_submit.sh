#!/usr/bin/env bash
# Run a relay job on a Ray cluster through `ray job submit`, on this machine, loopback only.
#
#   examples/ray_job_submit.sh                 # 4 GSM8K items, sequential latent relay, one host per agent
#   N=20 MODEL=qwen2.5-coder-0.5b examples/ray_job_submit.sh
#   examples/ray_job_submit.sh --max-new-tokens 64 --latent-steps 4    # extra arguments go to `relay run`
#
# 1. starts a Ray head that listens on 127.0.0.1 only (GCS, raylet, object store and the job server) and requires
#    a token made for this run,
# 2. submits `relay run ... --runtime ray --address auto` with this folder as the job's working directory,
# 3. stops the head again and deletes the token (also when the job fails or you press Ctrl-C).
# On a real cluster, skip steps 1 and 3 and point --address at your head's job server.
set -euo pipefail
cd "$(dirname "$0")/.."

RAY=${RAY:-ray}
[ -x .venv/bin/ray ] && RAY=.venv/bin/ray
GCS_PORT=${GCS_PORT:-6380}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
NUM_CPUS=${NUM_CPUS:-2}
MODEL=${MODEL:-smollm2-135m}
N=${N:-4}
OUT=${OUT:-$PWD/out/ray_job.jsonl}
DATA_DIR=${DATA_DIR:-${RELAY_DATA_DIR:-$(cd .. && pwd)/shared/data}}
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"  # the job's `relay` and python: this checkout's venv

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # every Ray process binds to 127.0.0.1 only
# Token authentication (Ray >= 2.60): every call to the head, the job client's included, carries a fresh random
# token, kept in an owner-only file in a private folder (not ~/.ray/auth_token, which every cluster would share)
# and removed with the head.
export RAY_AUTH_MODE=token
TOKEN_DIR=$(mktemp -d)  # mode 0700
export RAY_AUTH_TOKEN_PATH="$TOKEN_DIR/auth_token"
unset RAY_AUTH_TOKEN  # it would win over the file
trap 'rm -rf "$TOKEN_DIR"' EXIT
(umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
"$RAY" start --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --num-cpus="$NUM_CPUS" --object-store-memory=$((512 * 1024 * 1024)) --disable-usage-stats
# note: `ray stop` stops every Ray process of this user on the machine, not only this head
trap '"$RAY" stop 2>&1 | tail -n 1; rm -rf "$TOKEN_DIR"' EXIT

# The job runs on the cluster with this folder as its working directory; `--address auto` makes the relay
# runtime join the cluster the job runs in instead of starting its own. The job runs in a copy of this folder,
# so data and output paths are absolute. --resume lets a re-submitted job skip the items already in $OUT.
"$RAY" job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir . \
    --runtime-env-json '{"excludes": [".venv", ".git", "out", "*.gguf", "*.safetensors"]}' \
    -- relay run --graph sequential --relay latent --task gsm8k --n "$N" --model "$MODEL" \
       --data-dir "$DATA_DIR" \
       --runtime ray --address auto --placement per-node --out "$OUT" --resume "$@"
