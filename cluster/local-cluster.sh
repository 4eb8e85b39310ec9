#!/usr/bin/env bash
# A Ray head and two simulated GPU nodes on one machine: try warm runs and GPU placement without
# a GPU. Every node is a `ray start --block` process whose pid is kept in the state directory, so
# `stop` ends exactly these nodes (`ray stop` would kill every Ray process on the machine).
#
#   cluster/local-cluster.sh start     # prints the address to export
#   cluster/local-cluster.sh status    # nodes, resources (ray status)
#   cluster/local-cluster.sh stop
#
#   eval "$(cluster/local-cluster.sh env)"
#   python jobs/warm_cache.py --model llama-tiny --sizes 1,2 --device cpu --backend eager \
#       --gpus-per-compile 0.5 --cache /tmp/vcr-cache   # compile tasks land on gpu1 / gpu2 only
#
# Nodes: head (no GPU, runs drivers and the stats actor), gpu1 and gpu2 (1 fake GPU each, plus a
# custom resource `vcr_sim_<name>` naming the node, e.g. resources={"vcr_sim_gpu1": 0.01}).
# Env (read here only):
#   VCR_LOCAL_DIR   state and Ray temp dirs (default /tmp/vcr-local; keep it short: Ray's socket
#                   paths under it must stay below 107 characters)
#   VCR_LOCAL_PORT  head GCS port (default: a free port, recorded in $VCR_LOCAL_DIR/address)
#   VCR_LOCAL_CPUS  CPUs per node (default 1)
#   VCR_LOCAL_DASHBOARD_PORT  start the dashboard on this port (default: no dashboard)
# Token auth: on unless RAY_AUTH_MODE says otherwise (Ray's default for a new cluster); `start`
# creates ~/.ray/auth_token if missing and every node reads it. `ray start --address` does not
# turn auth on by itself, so the mode is exported to every node (and printed by `env`).
set -euo pipefail

DIR="${VCR_LOCAL_DIR:-/tmp/vcr-local}"
CPUS="${VCR_LOCAL_CPUS:-1}"
GPU_NODES=(gpu1 gpu2)
# Every node on its own loopback address (head 127.0.0.2, gpu1 127.0.0.3, gpu2 127.0.0.4), so
# nothing leaves loopback and Ray sees three hosts. Not 127.0.0.1: Ray swaps "localhost" node and
# head addresses for the machine's outside address in multi-node mode, and the single-node mode
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps 127.0.0.1) refuses `ray start --address`.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
HEAD_IP=127.0.0.2
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# SIGTERM drains a node for 30 s by default before stopping it; nothing to drain here.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() {  # alive NODE: its `ray start --block` process is running
  local pid
  pid="$(cat "$DIR/$1.pid" 2>/dev/null)" || return 1
  kill -0 "$pid" 2>/dev/null
}

start_node() {  # start_node NAME IP ARGS...: start one node in the background, wait until it is up
  local name="$1" ip="$2"; shift 2
  mkdir -p "$DIR/$name"
  nohup ray start --block --disable-usage-stats --node-ip-address="$ip" \
    --temp-dir="$DIR/$name" --num-cpus="$CPUS" \
    --dashboard-agent-listen-port="$(free_port)" --metrics-export-port="$(free_port)" \
    "$@" >"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
  local deadline=$((SECONDS + 90))
  until grep -qs "will now block" "$DIR/$name.log"; do
    if ! alive "$name"; then
      echo "local-cluster: node $name failed to start:" >&2
      tail -n 30 "$DIR/$name.log" >&2
      return 1
    fi
    if ((SECONDS > deadline)); then
      echo "local-cluster: node $name did not start in 90 s (log: $DIR/$name.log)" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "local-cluster: node $name up (pid $(cat "$DIR/$name.pid"))"
}

ensure_token() {  # token auth needs a token before the head starts; Ray makes none by itself
  if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    ray get-auth-token --generate >/dev/null  # creates ~/.ray/auth_token unless it exists
  fi
}

cmd_start() {
  if alive head; then
    echo "local-cluster: already running at $(cat "$DIR/address") (stop it first)" >&2
    return 1
  fi
  mkdir -p "$DIR"
  ensure_token
  local port="${VCR_LOCAL_PORT:-$(free_port)}"
  local dashboard=(--include-dashboard=false)
  if [[ -n "${VCR_LOCAL_DASHBOARD_PORT:-}" ]]; then
    dashboard=(--include-dashboard=true --dashboard-host=127.0.0.1
               --dashboard-port="$VCR_LOCAL_DASHBOARD_PORT")
  fi
  start_node head "$HEAD_IP" --head --port="$port" --num-gpus=0 --ray-client-server-port="$(free_port)" \
    "${dashboard[@]}" || { cmd_stop; return 1; }
  echo "$HEAD_IP:$port" >"$DIR/address"
  local i node
  for i in "${!GPU_NODES[@]}"; do
    node="${GPU_NODES[$i]}"
    start_node "$node" "127.0.0.$((i + 3))" --address="$HEAD_IP:$port" --num-gpus=1 \
      --resources="{\"vcr_sim_$node\": 1}" || { cmd_stop; return 1; }
  done
  echo "local-cluster: head + ${#GPU_NODES[@]} GPU nodes at $HEAD_IP:$port"
  cmd_env
}

cmd_stop() {
  local node pid pids=()
  for node in "${GPU_NODES[@]}" head; do  # workers first: the head's GCS outlives them
    if alive "$node"; then
      pid="$(cat "$DIR/$node.pid")"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$((SECONDS + 30))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$DIR"/*.pid "$DIR/address"
  echo "local-cluster: stopped ${#pids[@]} node(s)"
}

cmd_env() {
  if [[ ! -f "$DIR/address" ]]; then
    echo "local-cluster: not running" >&2
    return 1
  fi
  echo "export RAY_ADDRESS=$(cat "$DIR/address")"
  echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
  echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1"
}

cmd_status() {
  local node
  for node in head "${GPU_NODES[@]}"; do
    if alive "$node"; then echo "$node: running (pid $(cat "$DIR/$node.pid"))"; else echo "$node: stopped"; fi
  done
  if alive head; then ray status --address="$(cat "$DIR/address")"; fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
