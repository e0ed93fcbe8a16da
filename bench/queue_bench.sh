#!/bin/bash
# Queue mode beside proxy mode and Postfix, same run, same machine, same message:
#   smtp-source -> relay, smtp.mode = "proxy" (opens and clicks on) -> smtp-sink
#   smtp-source -> relay, smtp.mode = "queue" (250 once fsync'd)    -> smtp-sink, until the
#                  queue is empty (end to end, like Postfix's figure)
#   smtp-source -> Postfix relay                                    -> smtp-sink, queue drained
# Usage: bench/queue_bench.sh [MESSAGES] [SESSIONS] [WORKERS]   (root: installs the peers)
# Prints msgs/s for each (for queue mode: accepting, and end to end) and the ratios to Postfix.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
shared=${SHARED:-$root/../shared}
n=${1:-2000} s=${2:-20} workers=${3:-1}
relay=${RELAY:-$root/.venv/bin/relay}
[ -x "$relay" ] || relay=$(command -v relay)
port=2531

bash "$shared/bench/setup_refs.sh" >/dev/null
work=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
# smtp-source ends each line with CRLF itself: it gets the LF copy (as relay_bench.sh).
tr -d '\r' < "$shared/bench/newsletter.eml" > "$work/newsletter.eml"

queued() {  # messages still in the queue
  python3 -c "
import sqlite3; c = sqlite3.connect('$work/relay.db')
print(c.execute('SELECT messages FROM queue_totals').fetchone()[0])"
}

run_relay() {  # MODE -> "accept msgs/s A  end-to-end msgs/s E"
  rm -f "$work"/relay.db*
  cat > "$work/relay.toml" <<TOML
[smtp]
listen = "127.0.0.1:$port"
mode = "$1"
workers = $workers
# smtp-source sends one Message-ID over and over: remembering deliveries would make every
# copy after the first a duplicate that is never forwarded.
dedupe_hours = 0
[upstream]
host = "127.0.0.1"
port = 2526
tls = "none"
pool_size = $s
[http]
public_url = "https://track.shop.example"
[store]
url = "sqlite:///$work/relay.db"
[logging]
level = "WARNING"
TOML
  "$relay" smtp --config "$work/relay.toml" 2>"$work/relay.log" &
  pid=$!
  for _ in $(seq 100); do ss -ltn | grep -q "127.0.0.1:$port " && break; sleep 0.1; done
  bash "$shared/bench/relay_tput.sh" "$port" "$work/newsletter.eml" 200 "$s" >/dev/null  # warm-up
  if [ "$1" = queue ]; then
    until [ "$(queued)" = 0 ]; do sleep 0.05; done
  fi
  t0=$(date +%s.%N)
  smtp-source -s "$s" -m "$n" -F "$work/newsletter.eml" -f news@shop.example \
    -t reader@example.org 127.0.0.1:"$port"
  t1=$(date +%s.%N)
  if [ "$1" = queue ]; then
    until [ "$(queued)" = 0 ]; do sleep 0.05; done  # polling the end, as postfix_tput.sh
  fi
  t2=$(date +%s.%N)
  sent=$(python3 -c "
import sqlite3; c = sqlite3.connect('$work/relay.db')
print(c.execute(\"SELECT count(*) FROM recipients WHERE status = 'sent'\").fetchone()[0])")
  [ "$sent" = $((n + 200)) ] || echo "warning: $sent of $((n + 200)) copies sent ($1)" >&2
  kill $pid; wait $pid 2>/dev/null || true
  python3 -c "print('accept msgs/s %.0f  end-to-end msgs/s %.0f' % ($n/($t1-$t0), $n/($t2-$t0)))"
}

proxy_line=$(run_relay proxy)
queue_line=$(run_relay queue)
postfix_line=$(bash "$shared/bench/postfix_tput.sh" "$work/newsletter.eml" "$n" "$s")
e2e() { echo "$1" | awk '{print $NF}'; }
accept() { echo "$1" | awk '{print $3}'; }
ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
postfix=$(e2e "$postfix_line")

echo "messages: $n, sessions: $s, relay worker processes: $workers, message: newsletter.eml" \
  "($(wc -c < "$work/newsletter.eml") bytes), opens+clicks on, 10 links; load $(cut -d' ' -f1 /proc/loadavg)"
printf '%-44s %6s msgs/s  ratio to Postfix %s\n' "relay, proxy mode" "$(e2e "$proxy_line")" \
  "$(ratio "$(e2e "$proxy_line")" "$postfix")"
printf '%-44s %6s msgs/s  ratio to Postfix %s  (accepting: %s msgs/s)\n' \
  "relay, queue mode, end to end" "$(e2e "$queue_line")" \
  "$(ratio "$(e2e "$queue_line")" "$postfix")" "$(accept "$queue_line")"
printf '%-44s %6s msgs/s  (accepting: %s msgs/s)\n' "Postfix relay, end to end" "$postfix" \
  "$(accept "$postfix_line")"
