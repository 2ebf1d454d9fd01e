#!/usr/bin/env bash
# Submits one moe-adapt command to SLURM: one task per node, all started by `srun`.
#
#   launch/slurm.sh --nodes=2 --gpus_per_node=8 --time=04:00:00 --venv=/path/to/venv \
#       -- --config=configs/meta_dmoe.py:fmnist_shift --workdir=/shared/runs/mdmoe
#
# Options (all --key=value):
#   --nodes               number of hosts (required); one task runs on each
#   --gpus_per_node       GPUs each task sees (omitted: the partition's default)
#   --cpus_per_task       CPU cores per task
#   --partition, --account, --time, --job_name (default moe-adapt)
#   --output              the job's log (default slurm-%x-%j.out; relative paths are
#                         relative to the repository, the job's working directory)
#   --venv                virtualenv to activate (default: moe-adapt from PATH)
#   --dry_run             print the exact command (sbatch with its script) instead
# Everything after `--` is passed to moe-adapt.
#
# The script is given to `sbatch` on its standard input. Inside the allocation
# `srun` starts moe-adapt once per node with `--distributed=on`:
# jax.distributed.initialize() reads the coordinator, process count and process
# id from SLURM's environment by itself. The workdir must be on storage every
# node sees.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "slurm.sh: error: $*" >&2; exit 2; }

# Shell-quotes one word unless it is made of characters that need no quoting.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

nodes="" gpus_per_node="" cpus_per_task="" partition="" account="" time_limit=""
job_name="moe-adapt" output="slurm-%x-%j.out" venv="" dry_run=0
while (($#)); do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus_per_node="${1#*=}" ;;
    --cpus_per_task=*) cpus_per_task="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --job_name=*) job_name="${1#*=}" ;;
    --output=*) output="${1#*=}" ;;
    --venv=*) venv="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) die "unknown option '$1'; accepted: --nodes= --gpus_per_node= --cpus_per_task=" \
         "--partition= --account= --time= --job_name= --output= --venv= --dry_run," \
         "then -- and the moe-adapt arguments" ;;
  esac
  shift
done
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "--$1='$2' is invalid; accepted: an integer >= 1"; }
[[ -n "$nodes" ]] || die "--nodes is required (the number of hosts)"
positive nodes "$nodes"
[[ -z "$gpus_per_node" ]] || positive gpus_per_node "$gpus_per_node"
[[ -z "$cpus_per_task" ]] || positive cpus_per_task "$cpus_per_task"
(($#)) || die "no moe-adapt arguments; pass them after --, e.g. -- --config=FILE:ARG --workdir=DIR"

script="#!/bin/bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --chdir=$REPO_DIR"
[[ -z "$gpus_per_node" ]] || script+=$'\n'"#SBATCH --gpus-per-node=$gpus_per_node"
[[ -z "$cpus_per_task" ]] || script+=$'\n'"#SBATCH --cpus-per-task=$cpus_per_task"
[[ -z "$partition" ]] || script+=$'\n'"#SBATCH --partition=$partition"
[[ -z "$account" ]] || script+=$'\n'"#SBATCH --account=$account"
[[ -z "$time_limit" ]] || script+=$'\n'"#SBATCH --time=$time_limit"
script+=$'\n'"#SBATCH --output=$output"
script+=$'\n'"set -euo pipefail"
[[ -z "$venv" ]] || script+=$'\n'"source $(quote "$venv/bin/activate")"
line="srun moe-adapt --distributed=on"
for arg in "$@"; do line+=" $(quote "$arg")"; done
script+=$'\n'"$line"

if ((dry_run)); then
  printf "sbatch <<'EOF'\n%s\nEOF\n" "$script"
  exit 0
fi
printf '%s\n' "$script" | sbatch
