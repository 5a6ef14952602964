#!/usr/bin/env bash
# The README's main command (scripts/demo) end to end on the tiny preset:
# scenario build, a real server on free ports, TA, DAM and LFPM through the
# CLI, the CA/BA/ASR table, the metrics, and a clean SIGTERM stop.
# Usage: demo_tiny_test.sh SOURCE_DIR BINARY_DIR
set -euo pipefail
SRC=$1
BIN_DIR=$2
TMP=$(mktemp -d /tmp/mergeguard-demo-test.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
export BIN=$BIN_DIR/bin PRESET=tiny SCENARIO=$TMP/scenario WORK=$TMP/work
export PORT=$(free_port) METRICS_PORT=$(free_port) JOB_THREADS=1
export DAM_PARAMS="steps: 6, adamerging_steps: 4"
export LFPM_PARAMS="steps: 4, batch_size: 8, path_nodes: 2, trigger: {scan_steps: 4, scan_batch_size: 4}"
if ! "$SRC/scripts/demo" > "$TMP/out" 2>&1; then
  cat "$TMP/out"
  echo "FAIL: scripts/demo exited non-zero"
  exit 1
fi
cat "$TMP/out"
fail() { echo "FAIL: $*"; exit 1; }
for row in TA DAM LFPM; do
  grep -Eq "^$row +[0-9.]+% +[0-9.]+ +[0-9.]+% +[0-9.]+ +[0-9.]+% +[0-9.]+%" "$TMP/out" ||
    fail "no table row for $row"
done
for method in task_arithmetic dam lfpm; do
  grep -q "mergeguard_jobs_total{method=\"$method\",outcome=\"succeeded\"} 2" "$TMP/out" ||
    fail "the metrics do not count two succeeded $method jobs"
done
grep -q 'mergeguard_probe_attack_success_ratio_sum{method="lfpm",stage="after"}' "$TMP/out" ||
  fail "no probe ASR after LFPM in the metrics"
# Every served model was downloaded and verified.
for job in task_arithmetic dam lfpm; do
  for inputs in clean backdoored; do
    [ -s "$WORK/$job-$inputs/model.safetensors" ] || fail "no $job-$inputs model"
  done
done
# The server stopped on SIGTERM: nothing listens on its port any more.
if python3 -c "import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(('127.0.0.1', $PORT)) == 0 else 1)"; then
  fail "the server still listens on $PORT"
fi
echo "PASS"
