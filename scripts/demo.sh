#!/usr/bin/env bash
# The main job (README, "The demo"): a three-node sandbox cluster with its services (beat, a
# worker inside each node, Flower, the web GUI, metrics), guests with data, replication jobs on one-minute
# schedules - one with a rate limit, one guest replicated to two targets - and proof that the
# replicas are identical. Nothing here runs a job by hand: beat and the workers do it.
#
# Idempotent: when the sandbox already runs, it only shows it. It leaves the sandbox running;
# `make down` takes it down.
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/replq
PY=.venv/bin/python
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# --- the cluster -------------------------------------------------------------------------------
health() {
  # Prints: ok | repair NODE... (nodes or services down) | bare (no services) | none
  $R sandbox status --output-format json 2>/dev/null | $PY -c '
import json, sys
try:
    st = json.load(sys.stdin)
except ValueError:
    print("none"); sys.exit()
svc = st["services"]
if svc.get("redis", {}).get("state") != "up" or not st["nodes"]:
    print("none")
elif "beat" not in svc:
    print("bare")
else:
    down = [n["name"] for n in st["nodes"] if n["state"] != "up" or "worker" not in n["pids"]]
    svc_ok = all(svc.get(s, {}).get("state") == "up" for s in ("beat", "flower", "web", "metrics"))
    print("ok" if not down and svc_ok else "repair " + " ".join(down or [st["nodes"][0]["name"]]))' 2>/dev/null \
    || echo none
}

fresh=1
read -r health nodes <<<"$(health)"
case $health in
  ok)
    fresh=0
    say "a sandbox is already running: showing it (make down, then make demo, to start afresh)" ;;
  repair)
    fresh=0
    say "a sandbox is running with parts down: starting $nodes again (with their workers and any stopped service)"
    for n in $nodes; do $R sandbox start "$n"; done ;;
  bare)
    echo "demo: a sandbox without services runs in $($R sandbox status --output-format json | $PY -c \
      'import json, sys; print(json.load(sys.stdin)["dir"])'); take it down first (make down)" >&2
    exit 1 ;;
  *)
    if $R sandbox status >/dev/null 2>&1; then
      say "clearing away a stopped sandbox"
      $R sandbox down
    fi
    say "bringing up a 3-node sandbox cluster with beat, workers, Flower, the web GUI and metrics"
    $R sandbox up --nodes 3 ;;
esac
# Talk to this sandbox whatever REPLQ_REDIS_URL this shell had.
eval "$($R sandbox env)"
sandbox_dir=$REPLQ_SANDBOX_DIR

# --- guests with data -----------------------------------------------------------------------------
# guest VMID NODE DISKS MB: datasets rpool/data/subvol-VMID-disk-N on NODE, each with MB of data.
guest() {
  local vmid=$1 node=$2 disks=$3 mb=$4 args=() n ds
  if $R guest show "$vmid" >/dev/null 2>&1; then
    return 0
  fi
  for ((n = 0; n < disks; n++)); do
    ds=rpool/data/subvol-$vmid-disk-$n
    $R sandbox exec "$node" -- zfs list -H -o name "$ds" >/dev/null 2>&1 || $R sandbox exec "$node" -- zfs create "$ds"
    $R sandbox exec "$node" -- sh -c "head -c ${mb}M /dev/urandom > /$ds/data.bin && \
      echo 'guest $vmid disk $n, written $(date -u +%FT%TZ)' > /$ds/README && mkdir -p /$ds/etc && \
      echo 'hostname ct$vmid' > /$ds/etc/hostname"
    args+=(--disk "local-zfs:subvol-$vmid-disk-$n")
  done
  $R guest add "$vmid" --node "$node" --type lxc "${args[@]}"
  echo "guest $vmid on $node: $disks disk(s) with ${mb} MB each"
}

job() {  # job ID TARGET [create-local-job options]
  local id=$1
  shift
  $R read "$id" >/dev/null 2>&1 || $R create-local-job "$id" "$@"
}

if [ "$fresh" = 1 ] || ! $R guest show 100 >/dev/null 2>&1; then
  say "guests with data (ZFS datasets inside their nodes)"
  guest 100 node1 2 24
  guest 101 node2 1 8
  guest 102 node3 1 4

  say "replication jobs: every minute; 100-0 limited to 5 MB/s; guest 100 also to a second target"
  job 100-0 node2 --schedule '*/1' --rate 5 --comment 'DR copy, rate-limited'
  job 100-1 node3 --schedule '*/1' --comment 'second target'
  job 101-0 node3 --schedule '*/1'
  job 102-0 node1 --schedule '*/2'
fi
$R list

# --- replication on schedule ----------------------------------------------------------------------
# wait_synced [AFTER]: until every job has synced (after epoch AFTER) without error.
wait_synced() {
  local after=${1:-0} deadline=$((SECONDS + ${2:-240})) shown=0 rc
  while :; do
    rc=0
    $R status --output-format json | $PY -c '
import json, sys
after = float(sys.argv[1])
rows = json.load(sys.stdin)
if rows and all((r["last_sync"] or 0) > after and not r["fail_count"] for r in rows):
    sys.exit(0)
sys.exit(2 if any(r["state"] == "SYNCING" and r.get("progress") for r in rows) else 1)' "$after" || rc=$?
    if [ $rc = 0 ]; then
      echo
      return 0
    fi
    if [ $rc = 2 ] && [ $shown = 0 ]; then
      shown=1  # once: a run in progress, with its bytes, rate and ETA
      echo
      $R status
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo
      echo "demo: replication did not complete in time; see replq status, replq log ID and $sandbox_dir/logs" >&2
      $R status >&2 || true
      return 1
    fi
    printf '.'
    sleep 2
  done
}

if [ "$fresh" = 1 ]; then
  say "waiting for beat to enqueue the new jobs and the workers to run them (no run command)"
  wait_synced 0
  $R status

  say "writing new data into guest 100; the next scheduled run sends only the delta"
  marker=$(date +%s)
  $R sandbox exec node1 -- sh -c 'head -c 4M /dev/urandom > /rpool/data/subvol-100-disk-0/new.bin'
  echo "waiting for the next run of every job after $(date -d "@$marker" '+%H:%M:%S') (up to a minute or two)"
  wait_synced "$marker"
  $R log 100-0 | sed -n '1,40p'
else
  wait_synced 0 60 || true
fi

say "replq status"
$R status

# --- proof: the same data on source and targets ----------------------------------------------------
# sums NODE DATASET: checksums of every file, by relative path.
sums() {
  $R sandbox exec "$1" -- sh -c "cd /$2 && find . -type f ! -path './.zfs/*' -print0 | sort -z | xargs -0 sha256sum"
}
say "checksums on source and targets"
ok=1
for spec in "100 node1 node2,node3 2" "101 node2 node3 1" "102 node3 node1 1"; do
  read -r vmid src targets disks <<<"$spec"
  for ((n = 0; n < disks; n++)); do
    ds=rpool/data/subvol-$vmid-disk-$n
    want=$(sums "$src" "$ds")
    echo "$ds on $src (source):"
    echo "$want" | sed 's/^/    /'
    for t in ${targets//,/ }; do
      $R sandbox exec "$t" -- zfs mount "$ds" 2>/dev/null || true  # zfs-fuse: received, not always mounted
      if [ "$(sums "$t" "$ds")" = "$want" ]; then
        echo "  on $t (replica): identical"
      else
        echo "  on $t (replica): DIFFERENT" && ok=0
      fi
    done
  done
done
echo "replication snapshots of subvol-100-disk-0:"
for node in node1 node2 node3; do
  $R sandbox exec "$node" -- zfs list -H -t snapshot -o name -r rpool/data/subvol-100-disk-0 2>/dev/null \
    | sed "s/^/    $node: /" || true
done

# --- where to look ---------------------------------------------------------------------------------
say "the web GUI, Flower, metrics and the sandbox"
$R sandbox status --output-format json | $PY -c '
import json, sys
st = json.load(sys.stdin)
for name, label in (("web", "Web GUI:"), ("flower", "Flower:")):
    f = st.get(name) or {}
    print("%-9s %s  (user %s, password %s)" % (label, f.get("url"), f.get("user"), f.get("password")))'
metrics_url=$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["metrics"]["url"])' \
  "$sandbox_dir/sandbox.json" 2>/dev/null || true)
if [ -n "$metrics_url" ]; then
  echo "Metrics:  $metrics_url"
  $PY - "$metrics_url" <<'EOF'
import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().splitlines():
    if line.startswith(("replq_job_last_sync_age_seconds{", "replq_job_fail_count{")):
        print("    " + line)
EOF
fi
$R sandbox status
cat <<EOF

The sandbox keeps running; beat and the workers replicate every minute. Try:
  .venv/bin/replq status
  .venv/bin/replq sandbox stop node2      # a failed target: jobs go into error state and retry
  .venv/bin/replq sandbox start node2
  eval "\$(.venv/bin/replq sandbox env)"   # point another shell at this sandbox
Take it down with: make down
EOF
[ "$ok" = 1 ]
