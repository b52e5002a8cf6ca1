#!/usr/bin/env bash
# The main job: a three-node sandbox cluster (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/replq
if $R sandbox status >/dev/null 2>&1; then
  echo "demo: a sandbox is already up; showing it (make down to start afresh)"
else
  $R sandbox up --nodes 3
fi
$R sandbox status
