#!/usr/bin/env bash
# The MLflow server of a cluster's head (clusters/onprem.yaml, gpu.yaml, kuberay.yaml): `start [port]`
# (re)starts it on 127.0.0.1 only (uvicorn workers: $MLFLOW_WORKERS, default 4), runs in
# $MLFLOW_BACKEND (default SQLite in ~/mlflow), artifacts in $MLFLOW_ARTIFACTS (default ~/mlflow/artifacts;
# a bucket: s3://...), and returns once it answers; `stop` ends it.
# It runs in a session of its own, so `stop` ends its whole process group (uvicorn's workers too) and
# matches no other process by name. `ray down` leaves it running; the UI is `ray attach ... -p <port>`.
set -euo pipefail
dir="$HOME/mlflow"
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
stop() {
  [ -f "$dir/server.pid" ] || return 0
  local group; group="$(cat "$dir/server.pid")"
  kill -- "-$group" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 -- "-$group" 2>/dev/null || break; sleep 0.5; done
  kill -9 -- "-$group" 2>/dev/null || true
  rm -f "$dir/server.pid"
}
case "${1:-}" in
  start)
    port="${2:-5000}"
    stop
    if listening "$port"; then
      echo "error: 127.0.0.1:$port is taken by another process; pass another port" >&2
      exit 1
    fi
    mkdir -p "$dir"
    # uvicorn restarts a worker that misses a 5 s health check: on a busy head (trials starting) its
    # workers are still importing MLflow then, and the server never came up. 60 s.
    setsid mlflow server --host 127.0.0.1 --port "$port" --backend-store-uri "${MLFLOW_BACKEND:-sqlite:///$dir/mlflow.db}" \
      --artifacts-destination "${MLFLOW_ARTIFACTS:-$dir/artifacts}" --workers "${MLFLOW_WORKERS:-4}" \
      --uvicorn-opts "--timeout-worker-healthcheck 60" \
      > "$dir/server.log" 2>&1 < /dev/null &
    echo $! > "$dir/server.pid"
    # Return once it answers, so a `ray submit` right after `ray up` finds it.
    for _ in $(seq 120); do
      if listening "$port"; then echo "MLflow on 127.0.0.1:$port (log: $dir/server.log)"; exit 0; fi
      kill -0 "$(cat "$dir/server.pid")" 2>/dev/null || break
      sleep 1
    done
    echo "error: MLflow did not start on 127.0.0.1:$port; the end of $dir/server.log:" >&2
    tail -5 "$dir/server.log" >&2
    exit 1
    ;;
  stop) stop ;;
  *) echo "usage: $0 start [port] | stop" >&2; exit 2 ;;
esac
