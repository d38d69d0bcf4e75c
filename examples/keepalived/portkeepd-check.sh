#!/bin/bash
# keepalived's health check for a portkeepd active/backup pair
# (vrrp_script in keepalived.conf; examples/keepalived/README.md).
#
#   portkeepd-check.sh [--portkeepd PATH] [--data-dir DIR] [VIRTUAL_ADDRESS...]
#
# Healthy (exit 0) when portkeepd's control socket answers and, if this
# node holds one of the virtual addresses, portkeepd is active there.
# Unhealthy (exit 1) when portkeepd is not running, or when the node holds
# a virtual address while its portkeepd is backup: after `portkeepd ctl
# demote`, or after portkeepd stood down because the other node is active
# in a newer term (a network partition that split VRRP). keepalived then
# puts the node in FAULT, which gives the addresses up, and the other node
# takes them; once the addresses are gone the check passes again and the
# node returns to BACKUP.
set -u

portkeepd=/usr/local/bin/portkeepd
data_dir=/var/lib/portkeep

while [ $# -gt 0 ]; do
    case "$1" in
        --portkeepd) portkeepd=$2; shift 2 ;;
        --data-dir) data_dir=$2; shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done

status=$("$portkeepd" ctl --data-dir "$data_dir" --json status 2>/dev/null) || exit 1
case "$status" in
    *'"role":"active"'*) exit 0 ;;
esac
[ $# -eq 0 ] && exit 0
held=$(ip -o addr show 2>/dev/null) || exit 0
for vip in "$@"; do
    case "$held" in
        *" inet $vip/"* | *" inet6 $vip/"*) exit 1 ;;
    esac
done
exit 0
