#!/usr/bin/env bash
# portkeepd versus miniupnpd (Debian's miniupnpd-nftables), side by side, on
# the same network namespace topology and the same load generator:
#
#   pkbc-PID (clients)               pkbn-PID (NAT: the server under test)
#   pk-cli 10.231.0.2-.N/24 ─veth─ pk-lan 10.231.0.1/24
#                                    pk-ext 198.51.101.1/24 ─veth─ pk-ext-peer
#
# For each run and each server, a fresh server on a fresh nftables ruleset
# in the NAT namespace, then:
#
#   1. throughput: portkeep-bench, in the client namespace, creates
#      CLIENTS x PER MAP mappings (each client a separate address, all
#      internal ports distinct, so every request is a new mapping and a new
#      DNAT in nftables) with BATCH x INFLIGHT requests in flight, and
#      reports mappings/s over the whole create pass and in each tenth of it;
#   2. latency, for each RATE: a fresh server again, COUNT MAP creates (new
#      internal ports, one client) sent one at a time every 1/RATE s; p50 and
#      p99 of the replies.
#
# After each measurement the script counts the DNAT rules (miniupnpd) or the
# IPv4 DNAT map elements (portkeepd) in the NAT namespace's nftables and
# stops unless every mapping the bench saw granted is there. Runs alternate
# which server goes first; the summary gives the median of the runs.
#
# Usage (as root, from the repository, after
# `cargo build --release -p portkeepd -p portkeep-bench`):
#
#   scripts/bench-vs-miniupnpd.sh [--runs 3] [--clients 8] [--per-client 250]
#       [--batch 8] [--inflight 8] [--rates "50 200"] [--count 500]
#       [--store memory|durable|relaxed] [--servers "miniupnpd portkeepd"]
#       [--out results.jsonl]
#
# Needs ip and ss (iproute2), nft, jq and /usr/sbin/miniupnpd (apt-get
# install iproute2 nftables jq miniupnpd-nftables). Nothing leaves the two
# namespaces: neither has a route elsewhere and the external interface's
# peer is in the NAT namespace too. On exit (trap) the script stops every
# server it started and deletes both namespaces; Ctrl-C stops it at once, a
# SIGTERM sent to the script alone when the current measurement ends.
set -euo pipefail

runs=3
clients=8
per_client=250
batch=8
inflight=8
rates="50 200"
count=500
store=memory
servers="miniupnpd portkeepd"
out=
while [ $# -gt 0 ]; do
    case "$1" in
    --runs) runs=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --per-client) per_client=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --inflight) inflight=$2; shift 2 ;;
    --rates) rates=$2; shift 2 ;;
    --count) count=$2; shift 2 ;;
    --store) store=$2; shift 2 ;;
    --servers) servers=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 64 ;;
    esac
done

cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
bench=$(realpath "$target/release/portkeep-bench" 2>/dev/null || true)
portkeepd=$(realpath "$target/release/portkeepd" 2>/dev/null || true)
miniupnpd=/usr/sbin/miniupnpd

die() { echo "bench-vs-miniupnpd: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, nftables)"
for t in ip ss nft jq; do command -v "$t" >/dev/null || die "\`$t\` not found"; done
[ -x "$miniupnpd" ] || die "$miniupnpd not installed (apt-get install miniupnpd-nftables)"
[ -x "$bench" ] && [ -x "$portkeepd" ] ||
    die "no release build in $target (cargo build --release -p portkeepd -p portkeep-bench)"
[ "$clients" -ge 1 ] && [ "$clients" -le 200 ] || die "--clients must be 1-200"
[ $((1024 + clients * per_client)) -le 65536 ] || die "--clients x --per-client must fit in ports 1024-65535"
[ $((1024 + count)) -le 65536 ] || die "--count must fit in ports 1024-65535"

NAT_IP=10.231.0.1
EXT_IP=198.51.101.1 # miniupnpd refuses reserved blocks (TEST-NET-2 too) as its external address
CLIENT_BASE=10.231.0.2
CNS=pkbc-$$
NNS=pkbn-$$
dir=$(mktemp -d /tmp/bench-vs-miniupnpd.XXXXXX)
server_pid=

# Whether process $1 is gone (a zombie counts as gone: a daemonized
# miniupnpd is reaped by init, not by this script).
gone() { [ ! -d "/proc/$1" ] || grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

stop_server() {
    [ -n "$server_pid" ] || return 0
    # miniupnpd 2.3.1 can miss a SIGTERM that lands outside its select()
    # (it then sleeps until its next timer, up to 30 s): repeat it.
    for _ in $(seq 50); do
        gone "$server_pid" && break
        kill "$server_pid" 2>/dev/null || true
        sleep 0.1
    done
    gone "$server_pid" || kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}
cleanup() {
    stop_server
    ip netns del "$CNS" 2>/dev/null || true
    ip netns del "$NNS" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_c() { ip netns exec "$CNS" "$@"; }
in_n() { ip netns exec "$NNS" "$@"; }

# Topology: as crates/portkeep/tests/interop_miniupnpd.rs, with CLIENTS
# addresses on the client side (one subscriber each).
ip netns add "$CNS"
ip netns add "$NNS"
ip -n "$NNS" link add pk-lan type veth peer name pk-cli netns "$CNS"
ip -n "$NNS" link add pk-ext type veth peer name pk-ext-peer
for i in $(seq 0 $((clients - 1))); do
    ip -n "$CNS" addr add "10.231.0.$((2 + i))/24" dev pk-cli
done
ip -n "$NNS" addr add "$NAT_IP/24" dev pk-lan
ip -n "$NNS" addr add "$EXT_IP/24" dev pk-ext
for dev in lo pk-cli; do ip -n "$CNS" link set "$dev" up; done
for dev in lo pk-lan pk-ext pk-ext-peer; do ip -n "$NNS" link set "$dev" up; done

# The chains miniupnpd's nftables backend writes into (its defaults: table
# inet filter; chains miniupnpd, prerouting_miniupnpd, postrouting_miniupnpd),
# as Debian's /etc/miniupnpd/nft_init.sh creates them.
cat >"$dir/miniupnpd.nft" <<'EOF'
table inet filter {
    chain forward { type filter hook forward priority 0; policy drop; jump miniupnpd; }
    chain miniupnpd { }
    chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
    chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
    chain prerouting_miniupnpd { }
    chain postrouting_miniupnpd { }
}
EOF

# miniupnpd: PCP (and NAT-PMP) only, every client port 1024-65535 allowed to
# any external port 1024-65535, periodic rule cleaning off (the default), no
# lease file (it persists nothing, like portkeepd's memory store).
cat >"$dir/miniupnpd.conf" <<EOF
ext_ifname=pk-ext
listening_ip=pk-lan
enable_natpmp=yes
enable_upnp=no
secure_mode=no
system_uptime=no
min_lifetime=120
max_lifetime=86400
clean_ruleset_interval=0
uuid=8f1a6c55-4e0b-4d4e-9b1e-5e4b6f0c0a02
allow 1024-65535 10.231.0.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
EOF

# portkeepd: one UDP worker (miniupnpd is single-threaded), the same external
# address and port range, the nftables dataplane bound to the same
# interfaces, a per-subscriber quota that the run never reaches.
quota=$((per_client > count ? per_client : count))
cat >"$dir/portkeepd.toml" <<EOF
listen = ["$NAT_IP:5351"]
data_dir = "$dir/portkeep-data"
external_addresses = ["$EXT_IP"]
port_range = "1024-65535"
workers = 1
[lifetime]
min = 120
max = 86400
[subscribers]
max_mappings = $((quota + 1))
[store]
mode = "$store"
[dataplane]
kind = "nftables"
table = "portkeep"
on_stop = "flush"
external_interfaces = ["pk-ext"]
internal_interfaces = ["pk-lan"]
EOF

# Waits up to 10 s until something listens on NAT_IP:5351 in the NAT
# namespace.
wait_listening() {
    for _ in $(seq 200); do
        [ -n "$(in_n ss -ulnH src "$NAT_IP:5351")" ] && return 0
        sleep 0.05
    done
    cat "$dir"/*.log >&2 2>/dev/null || true
    die "$1 did not start listening on $NAT_IP:5351"
}

start_server() {
    stop_server
    # A fresh ruleset, in the NAT namespace only.
    in_n nft flush ruleset
    rm -rf "$dir/portkeep-data" "$dir/miniupnpd.pid"
    case "$1" in
    miniupnpd)
        in_n nft -f "$dir/miniupnpd.nft"
        # As a daemon, as it runs in production: -d would also turn on every
        # debug message (2.3.1 logs a line per rule on each rule-cache
        # refresh), and with no syslog daemon here glibc writes each one to
        # /dev/console, which is what a -d run then measures.
        in_n "$miniupnpd" -f "$dir/miniupnpd.conf" -P "$dir/miniupnpd.pid"
        for _ in $(seq 100); do [ -s "$dir/miniupnpd.pid" ] && break; sleep 0.05; done
        [ -s "$dir/miniupnpd.pid" ] || die "miniupnpd did not start (no pid file)"
        server_pid=$(cat "$dir/miniupnpd.pid")
        ;;
    portkeepd)
        # `ip netns exec` execs the server, so $! is the server's own pid.
        ip netns exec "$NNS" "$portkeepd" --config "$dir/portkeepd.toml" >"$dir/portkeepd.log" 2>&1 &
        server_pid=$!
        ;;
    esac
    wait_listening "$1"
}

# What server $1 has installed in nftables, as JSON: `dnat` counts the DNAT
# rules (miniupnpd) or IPv4 DNAT map elements (portkeepd); `other` the
# second half of each mapping: miniupnpd's forward accept rules, portkeepd's
# SNAT elements (the mapping's own outbound traffic).
installed() {
    local rules='[.nftables[] | select(.rule) | select(any(.rule.expr[]; has($e)))] | length'
    local elems='[.nftables[] | select(.map) | .map.elem // [] | length] | add'
    case "$1" in
    miniupnpd)
        jq -n --argjson d "$(in_n nft -j list chain inet filter prerouting_miniupnpd | jq --arg e dnat "$rules")" \
            --argjson o "$(in_n nft -j list chain inet filter miniupnpd | jq --arg e accept "$rules")" \
            '{dnat: $d, other: $o}'
        ;;
    portkeepd)
        jq -n --argjson d "$(in_n nft -j list map inet portkeep dnat4 | jq "$elems")" \
            --argjson o "$(in_n nft -j list map inet portkeep snat4 | jq "$elems")" \
            '{dnat: $d, other: $o}'
        ;;
    esac
}
load() { cut -d' ' -f1 /proc/loadavg; }

total=$((clients * per_client))
results=$dir/results.jsonl
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "topology up ($CNS, $NNS). throughput: $clients clients x $per_client = $total new mappings," \
    "$((batch * inflight)) in flight; latency: $count MAPs at each of $rates per s; portkeepd store: $store"
for run in $(seq "$runs"); do
    # Alternate which server goes first, so slow drift hits both alike.
    order=$servers
    [ $((run % 2)) = 1 ] || order=$(tr ' ' '\n' <<<"$servers" | tac | tr '\n' ' ')
    for server in $order; do
        start_server "$server"
        l=$(load)
        json=$(in_c "$bench" --server "$NAT_IP:5351" --client-base "$CLIENT_BASE" \
            --clients "$clients" --mappings-per-client "$per_client" --disjoint-ports \
            --port-base 1024 --duration 0 --batch "$batch" --inflight "$inflight" \
            --reply-timeout-ms 60000 --json)
        nft=$(installed "$server")
        stop_server
        ok=$(jq '.phases[0].success' <<<"$json")
        [ "$ok" = "$total" ] && [ "$(jq .dnat <<<"$nft")" = "$total" ] ||
            die "$server run $run: $ok of $total MAPs granted, in nftables $nft: $json"
        jq -c --arg s "$server" --argjson r "$run" --argjson n "$nft" --argjson l "$l" \
            '{server: $s, run: $r, kind: "throughput", load1: $l, installed: $n,
              per_second: .phases[0].requests_per_second, seconds: .phases[0].seconds,
              tenths: .phases[0].tenths_per_second, lost: .phases[0].lost, errors: .phases[0].errors}' \
            <<<"$json" | tee -a "$results"

        for rate in $rates; do
            start_server "$server"
            l=$(load)
            json=$(in_c "$bench" --server "$NAT_IP:5351" --client-base "$CLIENT_BASE" \
                --port-base 1024 --rate "$rate" --count "$count" --json)
            nft=$(installed "$server")
            stop_server
            ok=$(jq '.ok' <<<"$json")
            # A server that falls behind the rate may drop requests from a
            # full socket buffer (counted as lost); every granted one must
            # be in nftables all the same.
            [ "$ok" -gt 0 ] && [ "$(jq .dnat <<<"$nft")" = "$ok" ] ||
                die "$server run $run at $rate/s: $ok MAPs granted, in nftables $nft: $json"
            jq -c --arg s "$server" --argjson r "$run" --argjson n "$nft" --argjson l "$l" \
                '{server: $s, run: $r, kind: "latency", load1: $l, installed: $n, rate: .rate,
                  ok: .ok, errors: .errors, lost: (.sent - .ok - .errors),
                  p50_ms: .p50_ms, p99_ms: .p99_ms, p999_ms: .p999_ms, max_ms: .max_ms}' \
                <<<"$json" | tee -a "$results"
        done
    done
done

median() { sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
sel() { jq -r --arg s "$1" --arg k "$2" "select(.server == \$s and .kind == \$k) | $3" "$results"; }
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "medians of $runs runs:"
for server in $servers; do
    echo "  $server: $(sel "$server" throughput .per_second | median) mappings/s creating $total" \
        "(first tenth $(sel "$server" throughput '.tenths[0]' | median)/s," \
        "last tenth $(sel "$server" throughput '.tenths[-1]' | median)/s)"
    for rate in $rates; do
        r="select(.rate == $rate)"
        echo "    $count MAPs at $rate/s: p50 $(sel "$server" latency "$r | .p50_ms" | median) ms," \
            "p99 $(sel "$server" latency "$r | .p99_ms" | median) ms," \
            "lost $(sel "$server" latency "$r | .lost" | median)"
    done
done
if [ "$servers" = "miniupnpd portkeepd" ] || [ "$servers" = "portkeepd miniupnpd" ]; then
    awk -v a="$(sel portkeepd throughput .per_second | median)" \
        -v b="$(sel miniupnpd throughput .per_second | median)" \
        'BEGIN {printf "  mappings/s, portkeepd / miniupnpd: %.1f\n", a / b}'
fi
[ -z "$out" ] || cp "$results" "$out"
