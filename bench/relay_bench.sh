#!/bin/bash
# Relay throughput beside Postfix, same run, same machine, same message:
#   smtp-source -> relay (opens and clicks on) -> smtp-sink
#   smtp-source -> Postfix relay              -> smtp-sink (end to end, queue drained)
# Usage: bench/relay_bench.sh [MESSAGES] [SESSIONS]   (root: installs the reference peers)
# Prints msgs/s for the relay with 1 and with 2 SMTP worker processes, for Postfix, and the
# ratios.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
shared=${SHARED:-$root/../shared}
n=${1:-2000} s=${2:-20}
relay=${RELAY:-$root/.venv/bin/relay}
[ -x "$relay" ] || relay=$(command -v relay)

bash "$shared/bench/setup_refs.sh" >/dev/null
work=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT

# smtp-source reads the file line by line and ends each line with CRLF itself, so a CRLF file
# would go out with a stray CR on every line; both paths get the LF copy.
tr -d '\r' < "$shared/bench/newsletter.eml" > "$work/newsletter.eml"

run_relay() {  # WORKERS -> msgs/s
  rm -f "$work"/relay.db*
  cat > "$work/relay.toml" <<TOML
[smtp]
listen = "127.0.0.1:2530"
max_recipients = 1000
workers = $1
# smtp-source sends one Message-ID over and over: remembering deliveries would turn every
# copy after the first into a duplicate that is never forwarded.
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
  for _ in $(seq 100); do ss -ltn | grep -q "127.0.0.1:2530 " && break; sleep 0.1; done
  bash "$shared/bench/relay_tput.sh" 2530 "$work/newsletter.eml" 200 "$s" >/dev/null  # warm-up
  bash "$shared/bench/relay_tput.sh" 2530 "$work/newsletter.eml" "$n" "$s" | awk '{print $2}'
  tracked=$(python3 -c "
import sqlite3; c = sqlite3.connect('$work/relay.db')
print(c.execute(\"SELECT count(*) FROM messages WHERE decision LIKE '%rewrote 10 links, pixel inserted%'\").fetchone()[0])")
  [ "$tracked" = $((n + 200)) ] || echo "warning: only $tracked of $((n + 200)) messages were tracked" >&2
  kill $pid; wait $pid 2>/dev/null || true
}

relay1=$(run_relay 1)
relay2=$(run_relay 2)
postfix_line=$(bash "$shared/bench/postfix_tput.sh" "$work/newsletter.eml" "$n" "$s")
postfix_rate=$(echo "$postfix_line" | awk '{print $NF}')

echo "messages: $n, sessions: $s, message: newsletter.eml ($(wc -c < "$work/newsletter.eml") bytes), opens+clicks on, 10 links"
printf '%-40s %6s msgs/s  ratio %s\n' "relay, 1 process" "$relay1" "$(python3 -c "print('%.2f' % ($relay1 / $postfix_rate))")"
printf '%-40s %6s msgs/s  ratio %s\n' "relay, 2 worker processes" "$relay2" "$(python3 -c "print('%.2f' % ($relay2 / $postfix_rate))")"
printf '%-40s %6s msgs/s  (%s)\n' "Postfix relay, end to end" "$postfix_rate" "$postfix_line"
