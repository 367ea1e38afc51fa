#!/usr/bin/env bash
# Start or stop a local Ray head (token authentication on) for the `ray job submit` tests.
#
#   eval "$(tests/ray_head.sh start [STATE_DIR])"   # prints the exports below, waits until jobs can be submitted
#   tests/ray_head.sh stop [STATE_DIR]              # stops exactly the head started there, by its pid
#
# Exports printed by `start` (also written to STATE_DIR/env):
#   OLSS_TEST_RAY_ADDRESS            http://127.0.0.1:<dashboard port>  (job submission address)
#   OLSS_TEST_RAY_GCS_ADDRESS        127.0.0.1:<gcs port>                (ray.init address)
#   OLSS_TEST_RAY_AUTH_TOKEN_PATH    STATE_DIR/auth_token                (the head's token; pass it as RAY_AUTH_TOKEN_PATH)
# Nothing else in the caller's environment changes: the head itself runs with RAY_AUTH_MODE=token and
# RAY_AUTH_TOKEN_PATH set, and its jobs inherit both. The head lives in its own process group with
# its own --temp-dir and ports, so it never touches another Ray on the machine (no `ray stop`).
set -euo pipefail

command="${1:-}"
state_dir="${2:-${OLSS_RAY_HEAD_DIR:-${TMPDIR:-/tmp}/olss_ray_head_$(id -u)}}"
pid_file="$state_dir/head.pid"

free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start_head() {
  if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "ray_head.sh: a head started from $state_dir is already running (pid $(cat "$pid_file"))" >&2
    exit 1
  fi
  mkdir -p "$state_dir"
  local token_path="$state_dir/auth_token"
  python -c 'import secrets; print(secrets.token_hex(32))' > "$token_path"
  chmod 600 "$token_path"
  local gcs_port dashboard_port client_port agent_port ray_temp
  gcs_port="$(free_port)"; dashboard_port="$(free_port)"; client_port="$(free_port)"; agent_port="$(free_port)"
  # Ray's unix sockets live under --temp-dir and must stay below 107 bytes: keep it short, whatever STATE_DIR is.
  ray_temp="$(mktemp -d /tmp/olss_ray.XXXXXX)"
  echo "$ray_temp" > "$state_dir/ray_temp_dir"

  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token_path" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    RAY_USAGE_STATS_ENABLED=0 \
    setsid ray start --head --block \
      --node-ip-address=127.0.0.1 --port="$gcs_port" \
      --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
      --ray-client-server-port="$client_port" --dashboard-agent-listen-port="$agent_port" \
      --num-cpus="${OLSS_RAY_HEAD_NUM_CPUS:-2}" --object-store-memory=300000000 \
      --temp-dir="$ray_temp" \
      > "$state_dir/head.log" 2>&1 < /dev/null &
  echo $! > "$pid_file"

  local address="http://127.0.0.1:$dashboard_port"
  for _ in $(seq 1 240); do
    if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
      echo "ray_head.sh: ray start exited; log: $state_dir/head.log" >&2
      tail -20 "$state_dir/head.log" >&2
      stop_head
      exit 1
    fi
    # Jobs can be submitted once the job API answers an authenticated request.
    if curl -fsS -o /dev/null -H "Authorization: Bearer $(cat "$token_path")" "$address/api/jobs/" 2>/dev/null; then
      {
        echo "export OLSS_TEST_RAY_ADDRESS=$address"
        echo "export OLSS_TEST_RAY_GCS_ADDRESS=127.0.0.1:$gcs_port"
        echo "export OLSS_TEST_RAY_AUTH_TOKEN_PATH=$token_path"
      } | tee "$state_dir/env"
      return 0
    fi
    sleep 0.5
  done
  echo "ray_head.sh: the job API at $address did not come up in 120 s; log: $state_dir/head.log" >&2
  stop_head
  exit 1
}

stop_head() {
  [[ -f "$pid_file" ]] || { echo "ray_head.sh: no head started from $state_dir" >&2; return 0; }
  local pid
  pid="$(cat "$pid_file")"
  # SIGTERM to `ray start --block` drains the node and stops every process it started.
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 80); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  # Anything left in the head's own process group (setsid above) is ours alone.
  kill -KILL -- "-$pid" 2>/dev/null || true
  if [[ -f "$state_dir/ray_temp_dir" ]]; then
    rm -rf "$(cat "$state_dir/ray_temp_dir")"
  fi
  rm -f "$pid_file" "$state_dir/env" "$state_dir/ray_temp_dir"
}

case "$command" in
  start) start_head ;;
  stop) stop_head ;;
  *) echo "usage: $0 start|stop [STATE_DIR]" >&2; exit 2 ;;
esac
