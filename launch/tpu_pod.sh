#!/usr/bin/env bash
# Runs one moe-adapt command on every worker of a Cloud TPU VM slice (created if missing).
#
#   launch/tpu_pod.sh --name=mdmoe-v4 --zone=us-central2-b --accelerator_type=v4-32 \
#       -- --config=configs/meta_dmoe.py:fmnist_shift --workdir=/mnt/shared/runs/mdmoe
#
# Options (all --key=value):
#   --name, --zone        the slice (required)
#   --accelerator_type    e.g. v4-32, v5litepod-16; needed only to create the slice
#   --version             TPU VM image for creation (default tpu-ubuntu2204-base)
#   --project             Google Cloud project (default: gcloud's configured one)
#   --spot                create a Spot slice
#   --repo_url, --ref     workers `git clone`/fetch this repository at this ref instead
#                         of receiving a copy of this checkout (default ref: main)
#   --dry_run             print the exact commands instead of running them
# Everything after `--` is passed to moe-adapt.
#
# Steps:
#  1. `gcloud compute tpus tpu-vm describe` the slice, `create` it if that fails.
#  2. Code: without --repo_url, this checkout (minus .git, runs/, caches) is packed and
#     copied to every worker with `tpu-vm scp --worker=all`; with it, workers clone it.
#  3. `tpu-vm ssh --worker=all`: every worker installs the package in a uv virtualenv
#     (uv fetches Python 3.11 when the image has an older one) with jax[tpu], then runs
#     `moe-adapt --distributed=on ...`; jax.distributed.initialize() finds the other
#     workers by itself on Cloud TPU. The workdir must be storage every worker sees.
set -euo pipefail

JAX_VERSION=0.10.2
REMOTE_DIR='~/moe_adapt'  # Expanded by the worker's shell.
REMOTE_VENV='~/moe_adapt_venv'
REMOTE_TARBALL=moe_adapt.tar.gz
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

# Shell-quotes one word unless it is made of characters that need no quoting.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
show() {  # Prints a command, each word quoted as needed.
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s\n' "$out"
}

name="" zone="" accelerator_type="" version="tpu-ubuntu2204-base" project="" spot=0
repo_url="" ref="main" dry_run=0
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --spot) spot=1 ;;
    --repo_url=*) repo_url="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) die "unknown option '$1'; accepted: --name= --zone= --accelerator_type= --version=" \
         "--project= --spot --repo_url= --ref= --dry_run, then -- and the moe-adapt arguments" ;;
  esac
  shift
done
[[ -n "$name" ]] || die "--name is required (the TPU VM slice)"
[[ -n "$zone" ]] || die "--zone is required, e.g. --zone=us-central2-b"
(($#)) || die "no moe-adapt arguments; pass them after --, e.g. -- --config=FILE:ARG --workdir=DIR"

common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)

# 1. Create or reuse the slice.
describe=("${tpu[@]}" describe "$name" "${common[@]}")
create=()
if [[ -n "$accelerator_type" ]]; then
  create=("${tpu[@]}" create "$name" "${common[@]}" --accelerator-type="$accelerator_type"
    --version="$version")
  ((spot)) && create+=(--spot)
fi

# 2. The code on every worker.
pack=() copy=()
if [[ -n "$repo_url" ]]; then
  fetch="{ test -d $REMOTE_DIR/.git || git clone --quiet $(quote "$repo_url") $REMOTE_DIR; }"
  fetch+=" && git -C $REMOTE_DIR fetch --quiet origin $(quote "$ref")"
  fetch+=" && git -C $REMOTE_DIR checkout --quiet --detach FETCH_HEAD"
else
  tarball="${TMPDIR:-/tmp}/moe_adapt-$name.tar.gz"
  pack=(tar -czf "$tarball" --exclude=./.git --exclude=./runs --exclude=./venv
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache -C "$REPO_DIR" .)
  copy=("${tpu[@]}" scp "$tarball" "$name:$REMOTE_TARBALL" "${common[@]}" --worker=all)
  fetch="mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR"
fi

# 3. Install and run on every worker.
uv='~/.local/bin/uv'
remote="set -e && $fetch"
# Newer images mark the system Python as externally managed (PEP 668): hence the retry.
remote+=" && { test -x $uv || python3 -m pip install --quiet --user uv"
remote+=" || python3 -m pip install --quiet --user --break-system-packages uv; }"
remote+=" && { test -x $REMOTE_VENV/bin/python || $uv venv --quiet --python 3.11 $REMOTE_VENV; }"
remote+=" && $uv pip install --quiet --python $REMOTE_VENV/bin/python -e $REMOTE_DIR"
remote+=" 'jax[tpu]==$JAX_VERSION'"
remote+=" && cd $REMOTE_DIR && $REMOTE_VENV/bin/moe-adapt --distributed=on"
for arg in "$@"; do remote+=" $(quote "$arg")"; done
run=("${tpu[@]}" ssh "$name" "${common[@]}" --worker=all --command "$remote")

if ((dry_run)); then
  if ((${#create[@]})); then
    echo "$(show "${describe[@]}") >/dev/null 2>&1 || $(show "${create[@]}")"
  else
    show "${describe[@]}"
  fi
  if ((${#pack[@]})); then show "${pack[@]}"; show "${copy[@]}"; fi
  show "${run[@]}"
  exit 0
fi

if ! "${describe[@]}" >/dev/null 2>&1; then
  ((${#create[@]})) || die "slice '$name' not found in $zone; pass --accelerator_type to create it"
  "${create[@]}"
fi
if ((${#pack[@]})); then "${pack[@]}"; "${copy[@]}"; fi
"${run[@]}"
