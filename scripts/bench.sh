#!/usr/bin/env bash
# The standard benchmark scenarios: builds in release, starts the server with a bench config on
# loopback, runs each scenario RUNS times (default 3) with the load generator, and writes the
# medians into docs/BENCHMARKS.md (raw JSON lines into target/bench/results.jsonl).
#
#   scripts/bench.sh                 # every scenario
#   scripts/bench.sh fanout-1k idle  # only scenarios whose name starts with these words (their
#                                    # lines in results.jsonl are replaced, the others kept)
#   scripts/bench.sh 'fanout-10k$'   # a word ending in $ names one scenario exactly
#   RUNS=1 scripts/bench.sh guard    # quick look
#   PROFILE=1 RUNS=1 scripts/bench.sh fanout-10k   # also a perf profile of the server per scenario:
#                                    # target/bench/profile-NAME.txt (symbols), profile-NAME.md (grouped);
#                                    # PROFILE_DELAY=8 leaves out the first 8 s (connection phase)
#   SYSCALLS=1 RUNS=1 scripts/bench.sh fanout-10k   # also count the server's send system calls
#                                    # (perf stat on sendto/sendmsg/write/writev, the whole run): adds
#                                    # server_send_syscalls and frames_per_send to the result line
#   WORKERS=1 scripts/bench.sh fanout-10k          # server.worker_threads for the server (default 0,
#                                    # one per core)
#   SERVER_ENV="MALLOC_ARENA_MAX=1" scripts/bench.sh idle   # extra environment for the server
#   REPORT=0 scripts/bench.sh fanout  # an experiment: leave docs/BENCHMARKS.md alone
#   SERVER=uws scripts/bench.sh 'fanout-10k$'   # the same load against a reference server instead
#                                    # (bench/reference: uws = uWebSockets, ws = Node's ws; needs node
#                                    # and npm); results in target/bench/results-uws.jsonl, no report
#
# Only loopback addresses are used; every process started here is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
FILTER=("$@")

cargo build --release --bins --locked
BIN=target/release/incident-stream
LOADGEN=target/release/loadgen
OUT=target/bench
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
REFERENCE=${SERVER:-}
if [ -n "$REFERENCE" ]; then
  case "$REFERENCE" in uws|ws) ;; *) echo "SERVER must be uws or ws" >&2; exit 2;; esac
  (cd bench/reference && npm ci --no-audit --no-fund >/dev/null)
  RESULTS="$OUT/results-$REFERENCE.jsonl"
  REPORT=0
fi
if [ ${#FILTER[@]} -eq 0 ]; then
  : > "$RESULTS"
else
  # A partial run replaces only its own scenarios' lines; the report keeps the others.
  touch "$RESULTS"
  python3 - "$RESULTS" "${FILTER[@]}" <<'PY'
import json, sys
path, prefixes = sys.argv[1], sys.argv[2:]
def wanted(name):
    return any(name == p[:-1] if p.endswith("$") else name.startswith(p) for p in prefixes)
keep = [l for l in open(path) if l.strip() and not wanted(json.loads(l)["name"])]
open(path, "w").writelines(keep)
PY
fi
WORK=$(mktemp -d)
SERVER_PID=""
NATS_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true; fi
  if [ -n "$NATS_PID" ] && kill -0 "$NATS_PID" 2>/dev/null; then kill -TERM "$NATS_PID"; wait "$NATS_PID" || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

# Bench material: dev certs, a signing secret, an ES256 key, policies for acme and t0..t99.
$BIN certs generate --dir "$WORK/certs" >/dev/null
SECRET=$(head -c 32 /dev/urandom | xxd -p -c 64)
$LOADGEN --addr 127.0.0.1:1 --gen-es256-key "$WORK/es256.pem"
mkdir -p "$WORK/policies"
# Limits far above what the scenarios reach: the bench measures the server, not its limits.
cat > "$WORK/policies/_defaults.toml" <<EOF
enabled = true
[limits]
max_connections = 1000000
max_connections_per_subject = 1000000
connects_per_minute_per_subject = 1000000
messages_per_second = 1000000
message_burst = 1000000
publishes_per_second = 100000000
publish_burst = 100000000
EOF
for t in acme $(seq -f 't%g' 0 99); do echo "tenant = \"$t\"" > "$WORK/policies/$t.toml"; done

# A nats-server with JetStream on a free loopback port and a fresh file store (BUS=nats).
start_nats() {
  rm -rf "$WORK/nats"
  mkdir -p "$WORK/nats"
  NATS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/nats/store" -l "$WORK/nats/nats.log" &
  NATS_PID=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nats-server did not start:"; cat "$WORK/nats/nats.log"; exit 1
}

# A process's CPU seconds (user + system) from /proc, for the broker's share in the NATS rows.
proc_cpu_secs() {
  python3 -c 'import os,sys; f=open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")",1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK"))' "$1"
}

start_server() { # $1 = tls true|false, $2 = audit log true|false, $3 = bus local|nats
  rm -rf "$WORK/audit"
  local bus=${3:-local}
  if [ "$bus" = nats ]; then start_nats; fi
  cat > "$WORK/bench.toml" <<EOF
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2
worker_threads = ${WORKERS:-0}
[tls]
enabled = $1
cert = "$WORK/certs/server.crt"
key = "$WORK/certs/server.key"
generate = false
[websocket]
enable_compression = false
heartbeat_interval_secs = 30
[publish]
max_batch = 1000
[policies]
dir = "$WORK/policies"
[limits]
handshakes_per_second_per_ip = 0
[[auth.keys]]
kid = "bench"
algorithm = "HS256"
secret = "$SECRET"
[[auth.keys]]
kid = "bench-es256"
algorithm = "ES256"
public_key = "$WORK/es256.pem.pub"
[audit]
enabled = $2
path = "$WORK/audit/audit.log"
[log]
level = "warn"
[bus]
kind = "$bus"
[bus.nats]
url = "nats://127.0.0.1:${NATS_PORT:-4222}"
EOF
  if [ -n "$REFERENCE" ]; then
    # The reference speaks only plain ws:// and the local bus; the token secret is the bench's.
    if [ "$1" = true ] || [ "$bus" != local ]; then echo "SERVER=$REFERENCE: plain, local-bus scenarios only" >&2; exit 2; fi
    BENCH_SECRET="$SECRET" env ${SERVER_ENV:-} node bench/reference/server.js "$REFERENCE" > "$WORK/server.out" 2> "$WORK/server.err" &
  else
    env ${SERVER_ENV:-} $BIN --config "$WORK/bench.toml" serve > "$WORK/server.out" 2> "$WORK/server.err" &
  fi
  SERVER_PID=$!
  local scheme=http
  [ "$1" = true ] && scheme=https
  for _ in $(seq 200); do
    ADDR=$(sed -n 's#.*listening on https\?://\([0-9.:]*\).*#\1#p' "$WORK/server.out" | head -1)
    # Ready, not just listening: on NATS the stream must be consumed before events are published.
    if [ -n "$ADDR" ] && curl -skf "$scheme://$ADDR/ready" >/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server did not get ready:"; cat "$WORK/server.err"; exit 1
}

stop_server() {
  if ! kill -TERM "$SERVER_PID" 2>/dev/null; then
    # The server ended during the run: that is a failure of the scenario, not a quiet skip.
    local rc=0
    wait "$SERVER_PID" || rc=$?
    echo "the server (pid $SERVER_PID) exited during the run with status $rc; its stderr ends with:" >&2
    tail -20 "$WORK/server.err" >&2
    exit 1
  fi
  wait "$SERVER_PID" || true; SERVER_PID=""
  if [ -n "$NATS_PID" ]; then kill -TERM "$NATS_PID"; wait "$NATS_PID" || true; NATS_PID=""; fi
}

wanted() {
  [ ${#FILTER[@]} -eq 0 ] && return 0
  for f in "${FILTER[@]}"; do
    if [[ "$f" == *'$' ]]; then [[ "$1" == "${f%\$}" ]] && return 0; else [[ "$1" == "$f"* ]] && return 0; fi
  done
  return 1
}

# [AUDIT=false] [BUS=nats] scenario NAME TLS LOADGEN-ARGS...   (the audit log is on unless
# AUDIT=false; the local bus unless BUS=nats, which starts a nats-server for each run and adds its
# CPU seconds during the run to the result line as broker_cpu_secs)
scenario() {
  local name=$1 tls=$2; shift 2
  wanted "$name" || return 0
  for run in $(seq "$RUNS"); do
    start_server "$tls" "${AUDIT:-true}" "${BUS:-local}"
    local broker_before=""
    [ -n "$NATS_PID" ] && broker_before=$(proc_cpu_secs "$NATS_PID")
    local tlsargs=()
    [ "$tls" = true ] && tlsargs=(--ca "$WORK/certs/ca.crt")
    echo "== $name (run $run/$RUNS)" >&2
    local perf_pid=""
    if [ -n "${PROFILE:-}" ]; then
      # PROFILE_DELAY=S skips the first S seconds (the connection phase), so the profile shows
      # the steady fan-out only.
      (sleep "${PROFILE_DELAY:-0}"; exec perf record -F 999 -p "$SERVER_PID" -o "$OUT/$name.perf.data" 2>/dev/null) &
      perf_pid=$!
    fi
    local stat_pid=""
    if [ -n "${SYSCALLS:-}" ]; then
      perf stat -x, -o "$OUT/$name.syscalls.csv" -p "$SERVER_PID" \
        -e syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_write,syscalls:sys_enter_writev &
      stat_pid=$!
    fi
    local lg=0
    $LOADGEN --addr "$ADDR" "${tlsargs[@]}" --server-pid "$SERVER_PID" --name "$name" "$@" 2>"$WORK/loadgen.err" >> "$RESULTS" || lg=$?
    if [ "$lg" -ne 0 ]; then
      # The error comes first (a backtrace, with RUST_BACKTRACE set, after it).
      echo "loadgen failed with status $lg in $name run $run; its stderr begins with:" >&2
      head -20 "$WORK/loadgen.err" >&2
      exit 1
    fi
    if [ -n "$broker_before" ]; then
      python3 scripts/bench_report.py --add-broker-cpu "$RESULTS" "$broker_before" "$(proc_cpu_secs "$NATS_PID")"
    fi
    if [ -n "$stat_pid" ]; then
      kill -INT "$stat_pid"; wait "$stat_pid" || true
      python3 scripts/bench_report.py --add-send-syscalls "$RESULTS" "$OUT/$name.syscalls.csv"
    fi
    if [ -n "$perf_pid" ]; then
      kill -INT "$perf_pid"; wait "$perf_pid" || true
      perf report -i "$OUT/$name.perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
        > "$OUT/profile-$name.txt" || true
      us=$(tail -1 "$RESULTS" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("server_cpu_us_per_delivery") or 0)')
      scripts/profile_summary.py --us-per-delivery "$us" < "$OUT/profile-$name.txt" > "$OUT/profile-$name.md"
    fi
    stop_server
  done
}

HS=(--secret "$SECRET" --kid bench)
scenario fanout-1k          false "${HS[@]}" --connections 1000  --rate 200 --batch 10 --duration 15
scenario fanout-10k         false "${HS[@]}" --connections 10000 --rate 50  --batch 5  --duration 15
# The same 50 events/s into 10k subscribers, arriving as one post of 50 each second: what
# writes carrying ten times as many frames cost (what a coalescing delay would buy).
scenario fanout-10k-bursts  false "${HS[@]}" --connections 10000 --rate 50  --batch 50 --duration 15
scenario fanout-10k-tls     true  "${HS[@]}" --connections 10000 --rate 50  --batch 5  --duration 15
scenario saturation-1k      false "${HS[@]}" --connections 1000  --rate 0   --batch 50 --in-flight 4 --duration 15
scenario saturation-10k     false "${HS[@]}" --connections 10000 --rate 0   --batch 50 --in-flight 4 --duration 15
scenario idle-10k-plain     false "${HS[@]}" --connections 10000 --idle-secs 5
scenario idle-10k-tls       true  "${HS[@]}" --connections 10000 --idle-secs 5
AUDIT=false scenario idle-10k-plain-noaudit false "${HS[@]}" --connections 10000 --idle-secs 5
scenario handshake-tls-es256 true --es256-key "$WORK/es256.pem" --kid bench-es256 --connections 2000 --idle-secs 1 --scrape-audit
AUDIT=false scenario handshake-tls-es256-noaudit true --es256-key "$WORK/es256.pem" --kid bench-es256 --connections 2000 --idle-secs 1
scenario handshake-plain    false "${HS[@]}" --connections 5000 --idle-secs 1 --scrape-audit
AUDIT=false scenario handshake-plain-noaudit false "${HS[@]}" --connections 5000 --idle-secs 1
scenario isolation-baseline false "${HS[@]}" --connections 100   --rate 200 --batch 10 --duration 15
scenario isolation-100x100  false "${HS[@]}" --connections 10000 --tenants 100 --publish-tenant t7 --rate 200 --batch 10 --duration 15
scenario filter-heavy-1k    false "${HS[@]}" --connections 1000  --subs-per-conn 5 --rate 200 --batch 10 --duration 15
# The same fan-outs over NATS JetStream (one gateway node; nats-server on the same two cores).
BUS=nats scenario fanout-1k-nats  false "${HS[@]}" --connections 1000  --rate 200 --batch 10 --duration 15
BUS=nats scenario fanout-10k-nats false "${HS[@]}" --connections 10000 --rate 50  --batch 5  --duration 15

if [ "${REPORT:-1}" = 1 ]; then
  python3 scripts/bench_report.py "$RESULTS" docs/BENCHMARKS.md
  echo "wrote docs/BENCHMARKS.md from $RESULTS" >&2
else
  echo "REPORT=0: docs/BENCHMARKS.md left as it is; results in $RESULTS" >&2
fi
