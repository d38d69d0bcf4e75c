#!/usr/bin/env bash
# Failover of an established TCP connection through a Portkeep NAT pair.
#
#   sudo examples/failover-demo.sh
#
# Builds, in network namespaces on this machine:
#
#   inside host ── bridge "inside" ──┬── node-a (portkeepd + keepalived + nftables NAT) ──┬── bridge "outside" ── outside host
#   10.80.1.100                      └── node-b (portkeepd + keepalived + nftables NAT) ──┘                      198.51.100.100
#
# keepalived (examples/keepalived/keepalived.conf, the same notify script)
# moves two virtual addresses between the nodes: 10.80.1.1 (the inside
# host's gateway and PCP server) and 198.51.100.1 (the NAT's external
# address). The outside host opens a TCP connection to an inside service
# through a check-pointed MAP mapping and streams through it; the active
# node then dies (kill -9 of its portkeepd and keepalived, and its links go
# down as a dead machine's would). The backup takes over, installs the
# check-pointed mapping in its nftables table, and the connection carries
# on; the script prints the stall. A second service behind a mapping
# without the check-point option is unreachable until its client maps it
# again.
#
# Needs root, keepalived, nft, conntrack, ip and python3 (for the two TCP
# programs). Uses target/release/{portkeepd,portkeep}, building them if
# missing (or PORTKEEPD=... PORTKEEP=... to use others). Everything it
# creates is removed on exit, also on Ctrl-C or failure.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
PORTKEEPD=${PORTKEEPD:-$repo/target/release/portkeepd}
PORTKEEP=${PORTKEEP:-$repo/target/release/portkeep}

IN_VIP=10.80.1.1
EXT_VIP=198.51.100.1
INSIDE=10.80.1.100
OUTSIDE=198.51.100.100
LAN=(10.80.1.11 10.80.1.12)
WAN=(198.51.100.11 198.51.100.12)
NODES=(node-a node-b)
P=pkdemo
NS_SW=$P-sw NS_IN=$P-in NS_OUT=$P-out
NS=($P-a $P-b)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
info() { printf '   %s\n' "$*"; }
die() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (network namespaces, nftables)"
for t in ip nft conntrack keepalived python3; do
    command -v "$t" >/dev/null || die "$t not found (apt-get install -y keepalived nftables conntrack iproute2 python3)"
done
if [ ! -x "$PORTKEEPD" ] || [ ! -x "$PORTKEEP" ]; then
    say "building the release binaries"
    (cd "$repo" && cargo build --release --bins --locked)
fi

remove_namespaces() {
    for ns in "${NS[@]}" "$NS_IN" "$NS_OUT" "$NS_SW"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    done
    for ns in "${NS[@]}" "$NS_IN" "$NS_OUT" "$NS_SW"; do ip netns del "$ns" 2>/dev/null; done
}
# Leftovers of an interrupted run.
remove_namespaces || true
work=$(mktemp -d /tmp/portkeep-demo.XXXXXX)
chmod 755 "$work"
cleanup() {
    set +e
    remove_namespaces
    wait 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# The demo's mappings are the demo's: their nonces derive from a key of
# its own, gone with it (portkeep --key-file).
export PORTKEEP_KEY_FILE="$work/cli.key"

ms() { date +%s%3N; }

say "network: inside host, two NAT nodes, outside host"
for ns in "$NS_SW" "${NS[@]}" "$NS_IN" "$NS_OUT"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
for br in inside outside; do
    ip -n "$NS_SW" link add "$br" type bridge
    ip -n "$NS_SW" link set "$br" up
done
port=0
plug() { # NS IFNAME BRIDGE CIDR
    port=$((port + 1))
    ip -n "$NS_SW" link add "p$port" type veth peer name "$2" netns "$1"
    ip -n "$NS_SW" link set "p$port" master "$3" up
    ip -n "$1" addr add "$4" dev "$2"
    ip -n "$1" link set "$2" up
}
plug "$NS_IN" eth0 inside "$INSIDE/24"
ip -n "$NS_IN" route add default via "$IN_VIP"
plug "$NS_OUT" eth0 outside "$OUTSIDE/24"
for i in 0 1; do
    plug "${NS[$i]}" lan0 inside "${LAN[$i]}/24"
    plug "${NS[$i]}" wan0 outside "${WAN[$i]}/24"
    ip netns exec "${NS[$i]}" sysctl -qw net.ipv4.ip_forward=1
    # What the host's own firewall does on a NAT: nothing but portkeepd's
    # mappings reaches the external address (so a packet that arrives
    # before the mappings are installed is dropped, not answered with a
    # reset), and no inside address leaves untranslated.
    ip netns exec "${NS[$i]}" nft -f - <<EOF
table inet pairfw {
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan0" ip daddr $EXT_VIP drop
    }
    chain egress {
        type filter hook postrouting priority srcnat + 10; policy accept;
        oifname "wan0" ip saddr 10.80.1.0/24 drop
    }
}
EOF
done
info "inside $INSIDE (gateway $IN_VIP), outside $OUTSIDE, nodes ${LAN[*]} / ${WAN[*]}"

say "portkeepd on both nodes, role backup; keepalived decides"
"$PORTKEEPD" gen-certs "$work/certs" node-a node-b >/dev/null
for i in 0 1; do
    j=$((1 - i))
    d="$work/${NODES[$i]}"
    mkdir -p "$d"
    cat >"$d/portkeepd.toml" <<EOF
data_dir = "$d/data"
listen = ["$IN_VIP:5351"]
external_addresses = ["$EXT_VIP"]
port_range = "30000-30999"
workers = 1

[dataplane]
kind = "nftables"
external_interfaces = ["wan0"]
internal_interfaces = ["lan0"]

[ha]
role = "backup"
listen = "${LAN[$i]}:7000"
peer = "${LAN[$j]}:7000"
tls_ca = "$work/certs/ca.pem"
tls_cert = "$work/certs/${NODES[$i]}.pem"
tls_key = "$work/certs/${NODES[$i]}.key"
peer_name = "${NODES[$j]}"
EOF
    ip netns exec "${NS[$i]}" "$PORTKEEPD" --config "$d/portkeepd.toml" >"$d/portkeepd.log" 2>&1 &
    disown
    # keepalived runs only scripts that no user but root can change: use
    # copies in this root-owned directory, whoever owns the checkout.
    install -m 0755 "$repo"/examples/keepalived/portkeepd-{notify,check}.sh "$d/"
    sed -e "s#/etc/keepalived/portkeepd-notify.sh#$d/portkeepd-notify.sh --log $d/notify.log#" \
        -e "s#/etc/keepalived/portkeepd-check.sh#$d/portkeepd-check.sh#" \
        -e "s#/usr/local/bin/portkeepd#$PORTKEEPD#g" \
        -e "s#/var/lib/portkeep#$d/data#g" \
        -e "s#10\.0\.0\.1\b#$IN_VIP#g" \
        -e "s#192\.0\.2\.1\b#$EXT_VIP#g" \
        "$repo/examples/keepalived/keepalived.conf" >"$d/keepalived.conf"
done
for i in 0 1; do
    d="$work/${NODES[$i]}"
    for _ in $(seq 100); do
        "$PORTKEEPD" ctl --data-dir "$d/data" status >/dev/null 2>&1 && break
        sleep 0.05
    done
    ip netns exec "${NS[$i]}" keepalived --dont-fork --log-console --no-syslog --vrrp \
        --config-id "${NODES[$i]}" --use-file "$d/keepalived.conf" \
        --pid "$d/keepalived.pid" --vrrp_pid "$d/vrrp.pid" >"$d/keepalived.log" 2>&1 &
    disown
done

status() { "$PORTKEEPD" ctl --data-dir "$work/$1/data" --json status 2>/dev/null || true; }
active=
for _ in $(seq 300); do
    for i in 0 1; do
        s=$(status "${NODES[$i]}")
        if [[ $s == *'"role":"active"'* && $s == *'"in_sync":true'* ]]; then active=$i; fi
    done
    [ -n "$active" ] && break
    sleep 0.05
done
[ -n "$active" ] || die "no node became active with its backup in sync"
backup=$((1 - active))
info "keepalived made ${NODES[$active]} MASTER: its portkeepd is active, ${NODES[$backup]} is its backup (in sync)"

say "two services on the inside host, mapped through the VIP"
cat >"$work/echo.py" <<'EOF'
import socket, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])), reuse_port=True)
def serve(c):
    with c:
        while (b := c.recv(4096)):
            c.sendall(b)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF
for p in 8080 9090; do
    ip netns exec "$NS_IN" python3 "$work/echo.py" "$INSIDE" "$p" &
    disown
done
sleep 0.3
map() { ip netns exec "$NS_IN" "$PORTKEEP" map tcp "$@" --server "$IN_VIP" --lifetime 3600 --json --timeout 5; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
m1=$(map 8080 --checkpoint --nonce 0123456789abcdef01234567)
ext1=$(field external_port <<<"$m1")
[ "$(field checkpoint_honoured <<<"$m1")" = True ] || die "check-point not honoured: $m1"
info "tcp 8080: $EXT_VIP:$ext1, CHECKPOINT_REQUIRED honoured (on ${NODES[$backup]} before the answer)"
m2=$(map 9090 --nonce 76543210fedcba9876543210)
ext2=$(field external_port <<<"$m2")
info "tcp 9090: $EXT_VIP:$ext2, no check-point (volatile)"
dnat() { ip netns exec "${NS[$1]}" nft list map inet portkeep dnat4 | grep -oE '[0-9] : [0-9]' | wc -l; }
info "DNAT elements in the nftables table: ${NODES[$active]} $(dnat "$active"), ${NODES[$backup]} $(dnat "$backup") (a backup's table stays empty)"

cat >"$work/stream.py" <<'EOF'
# Sends a counter every 10 ms through the connection and reads it back;
# reports the longest gap between two echoes, and any error.
import json, os, socket, struct, sys, threading, time
host, port, stop, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), timeout=3)
s.settimeout(None)
state = {"sent": 0, "received": 0, "max_gap_ms": 0.0, "gap_end": None, "error": None, "in_order": True}
def writer():
    n = 0
    try:
        while not os.path.exists(stop):
            s.sendall(struct.pack("!Q", n)); n += 1; state["sent"] = n
            time.sleep(0.01)
    except OSError as e:
        state["error"] = "send: %s" % e
threading.Thread(target=writer, daemon=True).start()
buf, last, expect = b"", time.monotonic(), 0
s.settimeout(0.2)
while not (os.path.exists(stop) and state["received"] >= state["sent"]):
    try:
        b = s.recv(4096)
    except socket.timeout:
        if os.path.exists(stop) and time.monotonic() - last > 5: break
        continue
    except OSError as e:
        state["error"] = "recv: %s" % e; break
    if not b:
        state["error"] = "closed by the peer"; break
    now = time.monotonic()
    gap = (now - last) * 1000
    if gap > state["max_gap_ms"]:
        state["max_gap_ms"], state["gap_end"] = gap, time.time()
    last = now
    buf += b
    while len(buf) >= 8:
        (n,), buf = struct.unpack("!Q", buf[:8]), buf[8:]
        state["in_order"] &= n == expect; expect = n + 1
        state["received"] = expect
json.dump(state, open(out, "w"))
EOF
say "the outside host connects to $EXT_VIP:$ext1 and streams through it"
ip netns exec "$NS_OUT" python3 "$work/stream.py" "$EXT_VIP" "$ext1" "$work/stop" "$work/stream.json" &
stream=$!
probe() { # PORT: one echo through a new connection from outside
    ip netns exec "$NS_OUT" python3 -c '
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
    s.settimeout(1); s.sendall(b"ping"); sys.exit(0 if s.recv(4) == b"ping" else 1)
except OSError:
    sys.exit(1)' "$EXT_VIP" "$1"
}
probe "$ext2" && info "a new connection to $EXT_VIP:$ext2 (volatile) works" || die "the volatile mapping does not forward"
sleep 1.5
info "flow on ${NODES[$active]}: $(ip netns exec "${NS[$active]}" conntrack -L -p tcp --orig-port-dst "$ext1" 2>/dev/null | head -1)"

say "${NODES[$active]} dies: kill -9 of its keepalived and portkeepd, its links go down"
d="$work/${NODES[$active]}"
t0=$(ms)
# The VRRP child first (it holds the addresses and sends the adverts).
kill -9 "$(cat "$d/vrrp.pid")" 2>/dev/null || true
kill -9 "$(cat "$d/keepalived.pid")" 2>/dev/null || true
for pid in $(ip netns pids "${NS[$active]}"); do kill -9 "$pid" 2>/dev/null || true; done
ip -n "${NS[$active]}" link set lan0 down
ip -n "${NS[$active]}" link set wan0 down
for _ in $(seq 400); do
    [[ $(status "${NODES[$backup]}") == *'"role":"active"'* ]] && break
    sleep 0.01
done
t1=$(ms)
for _ in $(seq 100); do
    grep -q MASTER "$work/${NODES[$backup]}/notify.log" 2>/dev/null && break
    sleep 0.01
done
info "$((t1 - t0)) ms later ${NODES[$backup]}'s keepalived is MASTER and its portkeepd active: $(grep 'MASTER' "$work/${NODES[$backup]}/notify.log" | tail -1 | sed 's/.*promote: //')"
sleep 0.2
info "DNAT elements in ${NODES[$backup]}'s table now: $(dnat "$backup") (the check-pointed mapping)"
sleep 2.5
info "${NODES[$backup]}'s flow, picked up mid-stream: $(ip netns exec "${NS[$backup]}" conntrack -L -p tcp --orig-port-dst "$ext1" 2>/dev/null | head -1)"
touch "$work/stop"
wait "$stream" || true
[ -s "$work/stream.json" ] || die "the stream client reported nothing"
r=$(cat "$work/stream.json")
err=$(field error <<<"$r")
[ "$err" = None ] || die "the connection broke: $err ($r)"
[ "$(field in_order <<<"$r")" = True ] || die "data lost or reordered: $r"
stall=$(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])["max_gap_ms"]))' "$r")
info "the connection survived: $(field received <<<"$r") counters echoed in order, no reset"
info "stall: ${stall} ms (longest gap between two echoes at the outside host)"

say "the volatile mapping did not survive"
if probe "$ext2"; then die "$EXT_VIP:$ext2 still reachable after failover"; fi
info "$EXT_VIP:$ext2 is unreachable from outside"
m2=$(map 9090 --nonce 76543210fedcba9876543210)
ext2b=$(field external_port <<<"$m2")
info "the inside client maps tcp 9090 again: $EXT_VIP:$ext2b"
probe "$ext2b" || die "re-created mapping does not forward"
info "reachable again"

say "done: failover ${stall} ms stall for the check-pointed connection (takeover $((t1 - t0)) ms after the kill)"
