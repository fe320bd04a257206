# Helpers shared by the load benchmarks (load.sh, tls.sh): sourced, not run.

# Stops every process the script started (PIDS) and removes its work folder
# (WORK); set as the EXIT trap by both scripts.
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  # nginx and haproxy fork: stop whatever still runs from our config files.
  pkill -f "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}

# Waits until something listens on 127.0.0.1:$1 (up to 10 s).
wait_port() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2; return 1
}

# All pids of a process tree (nginx master + workers).
tree_pids() { echo "$1" $(pgrep -P "$1" 2>/dev/null || true); }
# CPU ticks (user + system) of a process tree, and its resident memory in KiB.
cpu_ticks() { local t=0; for p in $(tree_pids "$1"); do [[ -r /proc/$p/stat ]] && t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
rss_kib() { local r=0; for p in $(tree_pids "$1"); do [[ -r /proc/$p/status ]] && r=$((r + $(awk '/VmRSS/{print $2}' /proc/$p/status))); done; echo $r; }
HZ=$(getconf CLK_TCK)

to_ms() {  # wrk prints 212.00us, 1.20ms or 1.02s
  awk -v v="$1" 'BEGIN{ if (v ~ /us$/) printf "%.3f", v/1000; else if (v ~ /ms$/) printf "%.3f", v+0; else if (v ~ /s$/) printf "%.3f", v*1000; else print v }'
}
