#!/usr/bin/env bash
# Load benchmark: Fulcrum against nginx and HAProxy, proxying the same traffic
# to the same three backends on this machine, in one run.
#
#   benches/load.sh                 # full run: pinned and unpinned, 16 and 256 connections
#   SMOKE=1 benches/load.sh         # 1 s per row, to prove the script works
#   DURATION=20 WORKERS=2 POLICY=round-robin benches/load.sh
#   IDLE=10000 ...                  # idle keep-alive connections held for the memory row (0: skip)
#   WAVE=9000 ...                   # clients for the wave and burst memory rows (0: skip): fresh
#                                   # nginx and Fulcrum per row, clients arriving one after another
#                                   # (wave) or all asking at once (burst), held, then closed
#   SETTLE=5 ...                    # seconds after closing them before RSS is read again
#   REPEAT=3 benches/load.sh        # each row 3 times, proxies interleaved; the table shows medians
#   FLOOR=0 benches/load.sh         # without the floor row (benches/floor_proxy.rs: bytes copied
#                                   # on one tokio thread, no HTTP: the least a tokio proxy spends)
#   FULCRUM_BASE_BIN=/path/to/old/fulcrum benches/load.sh
#                                   # old against new instead of against nginx and HAProxy: three
#                                   # Fulcrum processes, base (the old binary), base2 (the old binary
#                                   # again, a second process: the A/A row that shows the noise) and
#                                   # new (FULCRUM_BIN, else target/release/fulcrum), measured as the
#                                   # fulcrum row is, PAIRS times (default 5) per connection count,
#                                   # the order turned each pair (base new base2, then new base2 base);
#                                   # pinned unless MODES says otherwise; no idle, wave, burst or floor
#                                   # rows. Prints every run, then medians and new ÷ base, base2 ÷ base
#                                   # of the median CPU µs per request (A/A spread: |base2 ÷ base − 1|),
#                                   # and the medians of the per-pair ratios (steadier when the machine
#                                   # changes speed mid-run)
#
# Installs nginx, haproxy and wrk with apt-get when missing. Every process it
# starts is stopped on exit, however it exits. Prints one table per mode:
# req/s, p50, p99, proxy CPU µs per request ((utime+stime) ÷ requests), proxy
# RSS at the end of the row, and ratios to nginx. Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh

DURATION=${DURATION:-10}
WORKERS=${WORKERS:-1}
POLICY=${POLICY:-least-conn}      # least-conn or round-robin, applied to all three proxies
CONNS=${CONNS:-"16 256"}
FULCRUM_BASE_BIN=${FULCRUM_BASE_BIN:-}
PAIRS=${PAIRS:-5}                 # old-vs-new mode (FULCRUM_BASE_BIN set): interleaved pairs per row
[[ -n "$FULCRUM_BASE_BIN" ]] && MODES=${MODES:-pinned}
MODES=${MODES:-"pinned unpinned"}
IDLE=${IDLE:-10000}
WAVE=${WAVE:-9000}
SETTLE=${SETTLE:-5}
REPEAT=${REPEAT:-1}
if [[ -n "${SMOKE:-}" ]]; then DURATION=1; CONNS=16; MODES=unpinned; IDLE=200; WAVE=200; SETTLE=1; REPEAT=1; PAIRS=2; fi
if [[ -n "$FULCRUM_BASE_BIN" ]]; then   # old against new: throughput rows of Fulcrum only
  [[ -x "$FULCRUM_BASE_BIN" ]] || { echo "FULCRUM_BASE_BIN=$FULCRUM_BASE_BIN is not an executable" >&2; exit 1; }
  IDLE=0; WAVE=0; FLOOR=0
fi

# Open files: the proxies inherit this shell's limit. The idle row needs IDLE client connections
# plus a batch of up to 500 backend ones in flight; the wave and burst rows up to one backend
# connection per client (2 × WAVE); 64 more for listeners, epoll and logs (benches/idle_conns.py
# checks the same before each row).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fds=64
((IDLE > 0)) && fds=$((IDLE + (IDLE < 500 ? IDLE : 500) + 64))
((WAVE > 0 && 2 * WAVE + 64 > fds)) && fds=$((2 * WAVE + 64))
if [[ $(ulimit -n) != unlimited ]] && (($(ulimit -n) < fds)); then
  echo "open-file limit too low: IDLE=$IDLE WAVE=$WAVE need $fds descriptors per proxy, but ulimit -n is $(ulimit -n) (hard $(ulimit -Hn)); raise the hard limit (as root: ulimit -Hn $fds, or LimitNOFILE=) or lower IDLE/WAVE" >&2
  exit 1
fi

need=()
for tool in nginx haproxy wrk taskset; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
  echo "installing: nginx haproxy wrk" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq nginx haproxy wrk util-linux >/dev/null
fi
PATH=$PATH:/usr/sbin

[[ -n "${FULCRUM_BIN:-}" ]] || cargo build --release --bin fulcrum >&2
FULCRUM=${FULCRUM_BIN:-$PWD/target/release/fulcrum}
# The floor row: the least a tokio proxy spends (benches/floor_proxy.rs). FLOOR=0 leaves it out.
FLOOR=${FLOOR:-1}
if ((FLOOR)); then
  [[ -n "${FLOOR_BIN:-}" ]] || cargo build --release --example floor_proxy >&2
  FLOOR_PROXY=${FLOOR_BIN:-$PWD/target/release/examples/floor_proxy}
fi

WORK=$(mktemp -d /tmp/fulcrum-load.XXXXXX)
PIDS=()
trap cleanup EXIT INT TERM

B1=19101 B2=19102 B3=19103
P_FULCRUM=18180 P_NGINX=18181 P_HAPROXY=18182 P_FLOOR=18183
P_BASE=18184 P_BASE2=18185   # old-vs-new mode: the two processes of the old binary (new: P_FULCRUM)
for port in $B1 $B2 $B3 $P_FULCRUM $P_NGINX $P_HAPROXY $P_FLOOR ${FULCRUM_BASE_BIN:+$P_BASE $P_BASE2}; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use: stop whatever listens there first" >&2; exit 1
  fi
done

# ---- backends: one nginx, one worker, three ports, a 6-byte body ----
# A burst of WAVE clients can open as many backend connections at once: room for them all, and a
# listen backlog that takes them without dropping SYNs (Fulcrum's connect timeout is 1 s).
BACKEND_CONNS=$((WAVE + 1024 > 4096 ? WAVE + 1024 : 4096))
mkdir -p "$WORK/backends" "$WORK/nginx"
cat > "$WORK/backends/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/backends/nginx.pid;
error_log $WORK/backends/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections $BACKEND_CONNS; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$B1 reuseport backlog=4096; location / { return 200 "hello\n"; } }
  server { listen 127.0.0.1:$B2 reuseport backlog=4096; location / { return 200 "hello\n"; } }
  server { listen 127.0.0.1:$B3 reuseport backlog=4096; location / { return 200 "hello\n"; } }
}
EOF

nginx_lb=least_conn; haproxy_lb=leastconn
if [[ "$POLICY" == round-robin ]]; then nginx_lb=""; haproxy_lb=roundrobin; fi

cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes $WORKERS;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backends {
    ${nginx_lb:+$nginx_lb;}
    server 127.0.0.1:$B1; server 127.0.0.1:$B2; server 127.0.0.1:$B3;
    keepalive 256;
  }
  server {
    listen 127.0.0.1:$P_NGINX;
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
}
EOF
# The same for the wave and burst rows, with room for 2 × WAVE connections (client + upstream
# side: nginx counts both); a copy, so the throughput rows' RSS stays comparable with past runs.
NGINX_WAVE_CONNS=$((2 * WAVE + 1024 > 16384 ? 2 * WAVE + 1024 : 16384))
sed "s/worker_connections 16384;/worker_connections $NGINX_WAVE_CONNS;/" "$WORK/nginx/nginx.conf" > "$WORK/nginx/nginx-wave.conf"

cat > "$WORK/haproxy.cfg" <<EOF
global
  nbthread $WORKERS
  maxconn 9900   # this machine's hard limit of 20,000 descriptors allows no more
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  option forwardfor
  default_backend be
backend be
  balance $haproxy_lb
  server b1 127.0.0.1:$B1
  server b2 127.0.0.1:$B2
  server b3 127.0.0.1:$B3
EOF

cat > "$WORK/fulcrum.toml" <<EOF
[server]
listen = "127.0.0.1:$P_FULCRUM"
workers = $WORKERS
header_read_timeout = "60s"     # the idle-connection row holds connections open for a while
[pools.web]
policy = "$POLICY"
backends = ["127.0.0.1:$B1", "127.0.0.1:$B2", "127.0.0.1:$B3"]
EOF
# Old-vs-new mode: the same config on the old binary's two ports.
sed "s/127.0.0.1:$P_FULCRUM/127.0.0.1:$P_BASE/" "$WORK/fulcrum.toml" > "$WORK/fulcrum-base.toml"
sed "s/127.0.0.1:$P_FULCRUM/127.0.0.1:$P_BASE2/" "$WORK/fulcrum.toml" > "$WORK/fulcrum-base2.toml"



start_backends() {  # $1: taskset prefix
  $1 nginx -c "$WORK/backends/nginx.conf" & PIDS+=($!)
  wait_port $B1
}

start_all() {  # $1: taskset prefix for the proxies, $2: for backends
  start_backends "$2"
  $1 nginx -c "$WORK/nginx/nginx.conf" & PIDS+=($!); NGINX_PID=$!
  $1 haproxy -f "$WORK/haproxy.cfg" -db & PIDS+=($!); HAPROXY_PID=$!
  RUST_LOG=warn $1 "$FULCRUM" run --config "$WORK/fulcrum.toml" & PIDS+=($!); FULCRUM_PID=$!
  wait_port $P_NGINX; wait_port $P_HAPROXY; wait_port $P_FULCRUM
  if ((FLOOR)); then
    $1 "$FLOOR_PROXY" "127.0.0.1:$P_FLOOR" "127.0.0.1:$B1" "127.0.0.1:$B2" "127.0.0.1:$B3" & PIDS+=($!); FLOOR_PID=$!
    wait_port $P_FLOOR
  fi
}

# Old-vs-new mode: backends and three Fulcrum processes, base and base2 on the old binary, new on
# FULCRUM. Sets AB_PID and AB_PORT, keyed base, base2, new.
declare -A AB_PID=() AB_PORT=([base]=$P_BASE [base2]=$P_BASE2 [new]=$P_FULCRUM)
start_ab() {  # $1: taskset prefix for the proxies, $2: for backends
  start_backends "$2"
  local bin
  for bin in base base2 new; do
    case $bin in
      base) RUST_LOG=warn $1 "$FULCRUM_BASE_BIN" run --config "$WORK/fulcrum-base.toml" & ;;
      base2) RUST_LOG=warn $1 "$FULCRUM_BASE_BIN" run --config "$WORK/fulcrum-base2.toml" & ;;
      new) RUST_LOG=warn $1 "$FULCRUM" run --config "$WORK/fulcrum.toml" & ;;
    esac
    PIDS+=($!); AB_PID[$bin]=$!
  done
  for bin in base base2 new; do wait_port "${AB_PORT[$bin]}"; done
}

stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}

# A fresh proxy for one wave or burst row: sets FRESH_PORT and FRESH_PID.
start_fresh() {  # $1: nginx or fulcrum, $2: taskset prefix
  case $1 in
    nginx) $2 nginx -c "$WORK/nginx/nginx-wave.conf" & FRESH_PID=$! FRESH_PORT=$P_NGINX ;;
    fulcrum) RUST_LOG=warn $2 "$FULCRUM" run --config "$WORK/fulcrum.toml" & FRESH_PID=$! FRESH_PORT=$P_FULCRUM ;;
  esac
  PIDS+=("$FRESH_PID")
  wait_port "$FRESH_PORT"
  if [[ $1 == nginx ]]; then   # its port opens before its workers are forked
    for _ in $(seq 100); do [[ -n "$(pgrep -P "$FRESH_PID")" ]] && break; sleep 0.05; done
  fi
  sleep 0.5
}

stop_one() {  # $1: a pid in PIDS
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  local keep=() pid
  for pid in "${PIDS[@]}"; do [[ $pid == "$1" ]] || keep+=("$pid"); done
  PIDS=("${keep[@]}")
}

# One wrk row: prints "req/s p50_ms p99_ms cpu_us_per_req rss_mib"
measure() {  # $1 port, $2 pid, $3 conns, $4 client taskset prefix
  $4 wrk -t1 -c"$3" -d1s "http://127.0.0.1:$1/" >/dev/null 2>&1 || true   # warm pools
  local before after out
  before=$(cpu_ticks "$2")
  out=$($4 wrk -t1 -c"$3" -d"${DURATION}s" --latency "http://127.0.0.1:$1/")
  after=$(cpu_ticks "$2")
  local requests rps p50 p99 errors
  requests=$(awk '/requests in/{print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out")
  p99=$(awk '$1=="99%"{print $2}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/{print}' <<<"$out" | tr '\n' ' ')
  [[ -n "$errors" ]] && echo "  (port $1, $3 conns: $errors)" >&2
  local cpu_us
  cpu_us=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$requests" 'BEGIN{printf "%.1f", n ? t * 1e6 / hz / n : 0}')
  echo "$rps $(to_ms "$p50") $(to_ms "$p99") $cpu_us $(awk -v k="$(rss_kib "$2")" 'BEGIN{printf "%.1f", k/1024}')"
}

# The median of each column over the rows given on stdin.
median_columns() {
  python3 -c 'import sys, statistics
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
print(" ".join("%g" % statistics.median(c) for c in zip(*rows)))'
}


# Reads "base base2 new" CPU µs/request per pair on stdin; prints the medians of the
# per-pair ratios new ÷ base, new ÷ base2 and base2 ÷ base (the A/A one).
pair_ratios() {
  awk -v c="$1" '
    function median(a, n,   i, j, t) {
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    NF == 3 && $1 > 0 && $2 > 0 && $3 > 0 { n++; nb[n] = $3 / $1; n2[n] = $3 / $2; aa[n] = $2 / $1 }
    END {
      if (n) printf "- %s conns, medians of the %d per-pair ratios: new ÷ base %.3f, new ÷ base2 %.3f, A/A base2 ÷ base %.3f\n", c, n, median(nb, n), median(n2, n), median(aa, n)
    }'
}

# Old against new (FULCRUM_BASE_BIN set): instead of the rows against nginx and HAProxy below.
if [[ -n "$FULCRUM_BASE_BIN" ]]; then
  echo "# Fulcrum old-vs-new load benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, policy $POLICY, $WORKERS worker(s) per proxy, ${DURATION}s per run, $PAIRS interleaved pairs per row"
  echo "# base, base2: $FULCRUM_BASE_BIN ($("$FULCRUM_BASE_BIN" --version), sha256 $(sha256sum "$FULCRUM_BASE_BIN" | cut -c1-12)); new: $FULCRUM ($("$FULCRUM" --version), sha256 $(sha256sum "$FULCRUM" | cut -c1-12))"
  echo "# backends $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
  for mode in $MODES; do
    if [[ $mode == pinned ]]; then PROXY_SET="taskset -c 1"; REST_SET="taskset -c 0"; else PROXY_SET=""; REST_SET=""; fi
    start_ab "$PROXY_SET" "$REST_SET"
    echo
    echo "## $mode$([[ $mode == pinned ]] && echo ': proxies on core 1; wrk and backends on core 0'): every run"
    echo
    echo "| conns | pair | order | binary | req/s | p50 ms | p99 ms | CPU µs/req | RSS MiB |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    declare -A runs=() pair_cpu=()
    for conns in $CONNS; do
      for pair in $(seq "$PAIRS"); do
        # The order turns each pair, so drift over the run favours neither binary.
        if ((pair % 2)); then order="base new base2"; else order="new base2 base"; fi
        slot=0
        for bin in $order; do
          slot=$((slot + 1))
          line=$(measure "${AB_PORT[$bin]}" "${AB_PID[$bin]}" "$conns" "$REST_SET")
          runs["$conns $bin"]+="$line"$'\n'
          read -r rps p50 p99 cpu rss <<<"$line"
          pair_cpu["$conns $pair $bin"]=$cpu
          echo "| $conns | $pair | $slot | $bin | $rps | $p50 | $p99 | $cpu | $rss |"
        done
      done
    done
    echo
    echo "## $mode: medians of $PAIRS pairs"
    echo
    echo "| binary | conns | req/s | p50 ms | p99 ms | CPU µs/req | RSS MiB | req/s ÷ base | CPU ÷ base |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    declare -A row=()
    for conns in $CONNS; do
      for bin in base base2 new; do row["$conns $bin"]=$(median_columns <<<"${runs["$conns $bin"]}"); done
      read -r b_rps _ _ b_cpu _ <<<"${row["$conns base"]}"
      for bin in base base2 new; do
        read -r rps p50 p99 cpu rss <<<"${row["$conns $bin"]}"
        awk -v p="$bin$([[ $bin == base2 ]] && echo ' (A/A)')" -v c="$conns" -v r="$rps" -v a="$p50" -v b="$p99" -v u="$cpu" -v m="$rss" -v br="$b_rps" -v bc="$b_cpu" \
          'BEGIN{printf "| %s | %s | %.0f | %s | %s | %s | %s | %.3f | %.3f |\n", p, c, r, a, b, u, m, (br ? r/br : 0), (bc ? u/bc : 0)}'
      done
    done
    echo
    for conns in $CONNS; do
      read -r _ _ _ b_cpu _ <<<"${row["$conns base"]}"
      read -r _ _ _ a_cpu _ <<<"${row["$conns base2"]}"
      read -r _ _ _ n_cpu _ <<<"${row["$conns new"]}"
      awk -v c="$conns" -v b="$b_cpu" -v a="$a_cpu" -v n="$n_cpu" 'BEGIN{
        d = b ? (n / b - 1) * 100 : 0; s = b ? (a / b - 1) * 100 : 0; if (s < 0) s = -s
        printf "- %s conns: median CPU µs/req new %s, base %s: new ÷ base %.3f (%+.1f %%); A/A spread |base2 ÷ base − 1| %.1f %%\n", c, n, b, (b ? n/b : 0), d, s}'
    done
    # The machine can change speed mid-run (every binary alike); a ratio taken
    # within one pair is steadier than the ratio of the arms' medians.
    for conns in $CONNS; do
      ratios=""
      for pair in $(seq "$PAIRS"); do
        ratios+="${pair_cpu["$conns $pair base"]:-0} ${pair_cpu["$conns $pair base2"]:-0} ${pair_cpu["$conns $pair new"]:-0}"$'\n'
      done
      pair_ratios "$conns" <<<"$ratios"
    done
    unset runs row pair_cpu
    stop_all
  done
  exit 0
fi

echo "# Fulcrum load benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, policy $POLICY, $WORKERS worker(s) per proxy, ${DURATION}s per row$( ((REPEAT > 1)) && echo ", median of $REPEAT interleaved runs")"
echo "# $("$FULCRUM" --version), $(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v | head -1 | awk '{print "HAProxy " $3}'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
ROWS="nginx haproxy fulcrum"
if ((FLOOR)); then ROWS+=" floor"; fi
for mode in $MODES; do
  if [[ $mode == pinned ]]; then PROXY_SET="taskset -c 1"; REST_SET="taskset -c 0"; else PROXY_SET=""; REST_SET=""; fi
  start_all "$PROXY_SET" "$REST_SET"
  echo
  echo "## $mode$([[ $mode == pinned ]] && echo ': proxy on core 1; wrk and backends on core 0')"
  echo
  echo "| proxy | conns | req/s | p50 ms | p99 ms | CPU µs/req | RSS MiB | req/s ÷ nginx | CPU ÷ nginx |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for conns in $CONNS; do
    declare -A row=() runs=()
    for _ in $(seq "$REPEAT"); do
      for proxy in $ROWS; do
        case $proxy in
          nginx) runs[$proxy]+="$(measure $P_NGINX "$NGINX_PID" "$conns" "$REST_SET")"$'\n' ;;
          haproxy) runs[$proxy]+="$(measure $P_HAPROXY "$HAPROXY_PID" "$conns" "$REST_SET")"$'\n' ;;
          fulcrum) runs[$proxy]+="$(measure $P_FULCRUM "$FULCRUM_PID" "$conns" "$REST_SET")"$'\n' ;;
          floor) runs[$proxy]+="$(measure $P_FLOOR "$FLOOR_PID" "$conns" "$REST_SET")"$'\n' ;;
        esac
      done
    done
    for proxy in $ROWS; do row[$proxy]=$(median_columns <<<"${runs[$proxy]}"); done
    read -r n_rps _ _ n_cpu _ <<<"${row[nginx]}"
    for proxy in $ROWS; do
      read -r rps p50 p99 cpu rss <<<"${row[$proxy]}"
      awk -v p="$proxy" -v c="$conns" -v r="$rps" -v a="$p50" -v b="$p99" -v u="$cpu" -v m="$rss" -v nr="$n_rps" -v nc="$n_cpu" \
        'BEGIN{printf "| %s | %s | %.0f | %s | %s | %s | %s | %.2f | %.2f |\n", p, c, r, a, b, u, m, (nr ? r/nr : 0), (nc ? u/nc : 0)}'
    done
  done
  if [[ $mode == "${MODES##* }" && "$IDLE" -gt 0 ]]; then
    echo
    echo "### $IDLE idle keep-alive client connections (one request each, then held open)"
    echo
    echo "| proxy | held | RSS before MiB | RSS holding MiB | bytes per connection |"
    echo "| --- | --- | --- | --- | --- |"
    for proxy in nginx haproxy fulcrum; do
      case $proxy in
        nginx) port=$P_NGINX pid=$NGINX_PID ;;
        haproxy) port=$P_HAPROXY pid=$HAPROXY_PID ;;
        fulcrum) port=$P_FULCRUM pid=$FULCRUM_PID ;;
      esac
      count=$IDLE
      [[ $proxy == haproxy && $count -gt 9000 ]] && count=9000   # HAProxy's maxconn, see above
      read -r held before after _ < <(python3 benches/idle_conns.py "$port" "$count" $(tree_pids "$pid"))
      awk -v p="$proxy" -v h="$held" -v b="$before" -v a="$after" \
        'BEGIN{printf "| %s | %d | %.1f | %.1f | %.0f |\n", p, h, b/1024, a/1024, h ? (a-b)*1024/h : 0}'
      sleep 1
    done
  fi
  stop_all
done

# Wave and burst: WAVE clients held by a proxy started fresh for each row, arriving one after
# another (at most 8 in progress) or all connected first and then all asking at once; RSS
# before, once all are idle, and SETTLE s after they all closed.
if ((WAVE > 0)); then
  echo
  echo "### $WAVE keep-alive clients in a wave (one after another, ≤ 8 in progress) and in a burst (all connect, then all ask at once), fresh proxies per row; after close: ${SETTLE} s after all closed"
  echo
  echo "| arrival | proxy | held | RSS before MiB | RSS idle MiB | RSS after close MiB | bytes per idle client | seconds |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  start_backends "${REST_SET:-}"
  for arrival in wave burst; do
    for proxy in nginx fulcrum; do
      start_fresh "$proxy" "${PROXY_SET:-}"
      if read -r held before idle after secs < <(python3 benches/idle_conns.py --mode "$arrival" --settle "$SETTLE" \
          "$FRESH_PORT" "$WAVE" $(tree_pids "$FRESH_PID")); then
        awk -v m="$arrival" -v p="$proxy" -v h="$held" -v b="$before" -v i="$idle" -v a="$after" -v s="$secs" \
          'BEGIN{printf "| %s | %s | %d | %.1f | %.1f | %.1f | %.0f | %s |\n", m, p, h, b/1024, i/1024, a/1024, h ? (i-b)*1024/h : 0, s}'
      else
        echo "| $arrival | $proxy | no figures: idle_conns.py refused or failed, see above | | | | | |"
      fi
      stop_one "$FRESH_PID"
      sleep 1
    done
  done
  stop_all
fi
