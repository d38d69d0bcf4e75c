#!/usr/bin/env bash
# An active/backup pair of portkeepd on loopback, in one command:
#
#   bash examples/ha-loopback.sh
#
# Starts node A (active) and node B (backup) linked over mutual TLS,
# creates check-pointed and volatile mappings for two clients with the
# `portkeep` CLI, kills A with SIGKILL, promotes B, and shows which
# mappings survived and what each client's epoch check (RFC 6887 section
# 8.5) concludes across the failover (RFC 7767; failure-scenarios draft
# section 2.6). Needs nothing but the two binaries (built here if
# missing) and loopback; everything it creates lives in a temporary
# directory removed on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PORTKEEP_BIN:-}" ]]; then
    cargo build --release --quiet -p portkeepd -p portkeep
    PORTKEEP_BIN=target/release
fi
D="$PORTKEEP_BIN/portkeepd"
C="$PORTKEEP_BIN/portkeep"

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
# The demo's mappings are the demo's: their nonces derive from a key of
# its own, gone with it (portkeep --key-file).
export PORTKEEP_KEY_FILE="$work/cli.key"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Ports: PCP 15351 (A) and 15352 (B), link 17001 (A) and 17002 (B).
PCP_A=127.0.0.1:15351 PCP_B=127.0.0.1:15352
step "certificates for the link (portkeepd gen-certs)"
"$D" gen-certs "$work/certs" node-a node-b

node_config() { # name peer-name role pcp link peer-link
    cat <<EOF
data_dir = "$work/$1"
listen = ["$4"]
workers = 1
[checkpoint]
default_class = "open"
[checkpoint.classes.open]
checkpoint = "on-request"
[ha]
role = "$3"
listen = "$5"
peer = "$6"
tls_ca = "$work/certs/ca.pem"
tls_cert = "$work/certs/$1.pem"
tls_key = "$work/certs/$1.key"
peer_name = "$2"
EOF
}
node_config node-a node-b active $PCP_A 127.0.0.1:17001 127.0.0.1:17002 >"$work/a.toml"
node_config node-b node-a backup $PCP_B 127.0.0.1:17002 127.0.0.1:17001 >"$work/b.toml"

step "start B (backup), then A (active)"
"$D" --config "$work/b.toml" --log-level warn 2>"$work/b.log" & pids+=($!)
sleep 0.3
"$D" --config "$work/a.toml" --log-level warn 2>"$work/a.log" & pids+=($!)
for _ in $(seq 100); do
    if "$D" ctl --data-dir "$work/node-a" --json status 2>/dev/null | grep -q '"in_sync":true'; then break; fi
    sleep 0.05
done
"$D" ctl --data-dir "$work/node-a" status | grep -E '^(role|term|ha\.link_state|ha\.in_sync):'

# Two clients, each mapping for itself from its own loopback address:
# 127.0.0.2 asks for check-points only; 127.0.0.3 also holds a volatile
# mapping.
map() { # client port [--checkpoint]
    "$C" map tcp "$2" --server $PCP_A --source "$1" ${3:-} --json
}
step "client 127.0.0.2: two check-pointed mappings"
map 127.0.0.2 8080 --checkpoint | tee "$work/m1"; echo
map 127.0.0.2 8081 --checkpoint | tee "$work/m2"; echo
step "client 127.0.0.3: one check-pointed, one volatile"
map 127.0.0.3 9090 --checkpoint | tee "$work/m3"; echo
map 127.0.0.3 9091 | tee "$work/m4"; echo
field() { sed -n "s/.*\"$1\":\"\{0,1\}\([^,\"]*\).*/\1/p" "$2"; }
echo "epochs on A: 127.0.0.2 -> $(field epoch "$work/m2"), 127.0.0.3 -> $(field epoch "$work/m4")"

step "the backup holds the check-pointed state (not the volatile mapping)"
"$D" ctl --data-dir "$work/node-b" status | grep -E '^ha\.(in_sync|checkpointed_mappings|volatile_subscribers):'

sleep 3
# Each client renews a check-pointed mapping just before the failure: the
# epoch it last saw, and when.
renew() { # client port file server
    "$C" map tcp "$2" --server "$4" --source "$1" --checkpoint --nonce "$(field nonce "$3")" --json
}
renew 127.0.0.2 8080 "$work/m1" $PCP_A >"$work/m1.before"; date +%s.%N >"$work/m1.t0"
renew 127.0.0.3 9090 "$work/m3" $PCP_A >"$work/m3.before"; date +%s.%N >"$work/m3.t0"
step "kill -9 A, promote B (what keepalived's notify hook would do)"
{ kill -9 "${pids[1]}"; wait "${pids[1]}"; } 2>/dev/null || true
"$D" ctl --data-dir "$work/node-b" promote

step "mappings on B, the new active"
"$D" ctl --data-dir "$work/node-b" mappings
echo
# Each client renews the same mapping on B and checks the epoch as RFC 6887
# section 8.5 has it: valid means its state was kept; invalid means it
# was lost, and the client re-creates its mappings.
verdict() { # previous-epoch current-epoch seconds-apart
    awk -v p="$1" -v c="$2" -v cd="$3" 'BEGIN {
        sd = c - p
        if (c < p - 1 || cd + 2 < sd - sd / 16 || sd + 2 < cd - cd / 16) print "invalid"; else print "valid"
    }'
}
refresh() { # client port file
    renew "$1" "$2" "$3" $PCP_B >"$3.after"
    local apart before after
    apart=$(awk -v a="$(cat "$3.t0")" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    before=$(field epoch "$3.before") after=$(field epoch "$3.after")
    echo "  $1 tcp/$2: external port $(field external_port "$3") before, $(field external_port "$3.after") after; epoch $before before, $after after, $apart s apart: $(verdict "$before" "$after" "$apart")"
}
refresh 127.0.0.2 8080 "$work/m1"
echo "    (valid: all of 127.0.0.2's state was check-pointed, so its epoch continues)"
refresh 127.0.0.3 9090 "$work/m3"
echo "    (invalid: 127.0.0.3 lost its volatile mapping, so its epoch restarted; B also sent it an ANNOUNCE)"
step "done: the check-pointed mappings kept their external ports; the volatile one is gone"
