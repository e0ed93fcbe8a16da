#!/bin/bash
# Relay throughput beside Postfix, same run, same machine, same message:
#   smtp-source -> relay (opens and clicks on) -> smtp-sink
#   smtp-source -> Postfix relay              -> smtp-sink (end to end, queue drained)
# Usage: bench/relay_bench.sh [MESSAGES] [SESSIONS]   (root: installs the reference peers)
# Prints msgs/s for both and their ratio.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
shared=${SHARED:-$root/../shared}
n=${1:-2000} s=${2:-20}
relay=${RELAY:-$root/.venv/bin/relay}
[ -x "$relay" ] || relay=$(command -v relay)

bash "$shared/bench/setup_refs.sh" >/dev/null
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT

# smtp-source reads the file line by line and ends each line with CRLF itself, so a CRLF file
# would go out with a stray CR on every line; both paths get the LF copy.
tr -d '\r' < "$shared/bench/newsletter.eml" > "$work/newsletter.eml"

cat > "$work/relay.toml" <<TOML
[smtp]
listen = "127.0.0.1:2530"
max_recipients = 1000
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
relay_rate=$(bash "$shared/bench/relay_tput.sh" 2530 "$work/newsletter.eml" "$n" "$s" | awk '{print $2}')
postfix_line=$(bash "$shared/bench/postfix_tput.sh" "$work/newsletter.eml" "$n" "$s")
postfix_rate=$(echo "$postfix_line" | awk '{print $NF}')
tracked=$(python3 -c "
import sqlite3; c = sqlite3.connect('$work/relay.db')
print(c.execute(\"SELECT count(*) FROM messages WHERE decision LIKE '%rewrote 10 links, pixel inserted%'\").fetchone()[0])")

echo "messages: $n, sessions: $s, message: newsletter.eml ($(wc -c < "$work/newsletter.eml") bytes)"
printf '%-44s %8s msgs/s\n' "relay (opens+clicks, 10 links rewritten)" "$relay_rate"
printf '%-44s %8s msgs/s   (%s)\n' "Postfix relay, end to end" "$postfix_rate" "$postfix_line"
python3 -c "print('ratio relay/Postfix: %.2f' % ($relay_rate / $postfix_rate))"
echo "messages the relay tracked: $tracked of $((n + 200))"
