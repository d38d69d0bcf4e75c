#!/bin/bash
# keepalived's notify hook for a portkeepd active/backup pair
# (examples/keepalived/README.md).
#
#   portkeepd-notify.sh [--portkeepd PATH] [--data-dir DIR] [--log FILE] \
#       TYPE NAME STATE [PRIORITY]
#
# keepalived appends TYPE (GROUP or INSTANCE), NAME, STATE and PRIORITY to
# the options written in keepalived.conf. STATE MASTER runs
# `portkeepd ctl promote` (install the check-pointed state received as
# backup and serve PCP); BACKUP, FAULT and STOP run `portkeepd ctl demote`
# (stop serving and drop this node's state). Both are idempotent: a node
# already in the wanted role answers "changed": false and this script
# exits 0.
#
# Messages go to syslog (tag portkeepd-notify), to stderr, and to --log
# FILE when given.
set -u

portkeepd=/usr/local/bin/portkeepd
data_dir=/var/lib/portkeep
log_file=

while [ $# -gt 0 ]; do
    case "$1" in
        --portkeepd) portkeepd=$2; shift 2 ;;
        --data-dir) data_dir=$2; shift 2 ;;
        --log) log_file=$2; shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done

log() {
    local msg="$*"
    logger -t portkeepd-notify -- "$msg" 2>/dev/null || true
    printf 'portkeepd-notify: %s\n' "$msg" >&2
    if [ -n "$log_file" ]; then
        printf '%s portkeepd-notify[%d]: %s\n' "$(date +%H:%M:%S.%N)" "$$" "$msg" >>"$log_file" 2>/dev/null || true
    fi
}

if [ $# -lt 3 ]; then
    log "usage: $0 [--portkeepd PATH] [--data-dir DIR] [--log FILE] TYPE NAME STATE [PRIORITY]"
    exit 64
fi
kind=$1 name=$2 state=$3

case "$state" in
    MASTER) want=promote ;;
    BACKUP | FAULT | STOP) want=demote ;;
    *)
        log "$kind $name: state $state: nothing to do"
        exit 0
        ;;
esac

# keepalived starts one process per transition and does not wait for it,
# so two of them can overlap (a quick MASTER -> BACKUP, say). Each records
# the role it was asked for before queueing on the lock; whoever holds the
# lock applies the latest recorded one, so the node ends in the role of the
# last transition even when the processes run out of order.
wanted="$data_dir/notify.wanted"
if [ -d "$data_dir" ]; then
    printf '%s\n' "$want" >"$wanted.$$" && mv -f "$wanted.$$" "$wanted"
    exec 9>>"$data_dir/notify.lock"
    flock -w 30 9 || log "could not take $data_dir/notify.lock; going on"
    want=$(cat "$wanted" 2>/dev/null || echo "$want")
fi

out=$("$portkeepd" ctl --data-dir "$data_dir" --json "$want" 2>&1)
rc=$?
case "$rc" in
    0)
        case "$out" in
            *'"changed":false'*) log "$kind $name $state: $want: already in that role ($out)" ;;
            *) log "$kind $name $state: $want: done ($out)" ;;
        esac
        exit 0
        ;;
    69)
        # The control socket does not answer: portkeepd is not running.
        if [ "$want" = demote ]; then
            log "$kind $name $state: portkeepd is not running: nothing to demote ($out)"
            exit 0
        fi
        log "$kind $name $state: cannot promote: portkeepd is not running ($out)"
        exit 1
        ;;
    *)
        log "$kind $name $state: $want failed (exit $rc): $out"
        exit 1
        ;;
esac
