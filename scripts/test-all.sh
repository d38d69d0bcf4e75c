#!/usr/bin/env bash
# Runs Portkeep's whole test suite, installing what it needs first.
#
# On a fresh Debian machine, run it as root: it installs the packages the
# end-to-end tests use (tshark for the Wireshark dissector check,
# miniupnpd-nftables for client interop, nftables, conntrack, iproute2 and
# procps for network namespaces, keepalived for the active/backup failover
# tests, strace to inject fsync failures, natpmpc for NAT-PMP interop,
# etcd-server for the etcd
# coordinator's tests, protobuf-compiler and libprotobuf-dev (the
# well-known .proto files it imports) to build its client, prometheus and
# systemd for the metrics and unit checks, dpkg-dev and binutils for the
# Debian package), cargo-deb for the package test and cargo-fuzz for the
# fuzz smoke run. As a normal user it
# installs nothing and the tests that need root skip with a loud message.
#
# A test that cannot run here (not root, a tool missing) fails when CI is
# set (CI=true), and skips otherwise; every skip is recorded in the file
# named by PORTKEEP_SKIP_LOG, and the run ends with their count and list.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
packages=(tshark nftables miniupnpd-nftables iproute2 procps conntrack keepalived strace etcd-server protobuf-compiler libprotobuf-dev natpmpc prometheus systemd dpkg-dev binutils)

step() { printf '\n==> %s\n' "$*"; }

skip_log=$(mktemp)
export PORTKEEP_SKIP_LOG="$skip_log"
corpus=""
previous_src=""
# Always the last words, whether the run passed or not: the skipped tests.
finish() {
    local status=$?
    local n
    n=$(grep -c . "$skip_log" || true)
    printf '\nskipped tests: %s\n' "$n"
    sed 's/^/  /' "$skip_log"
    rm -f "$skip_log"
    if [ -n "$corpus" ]; then rm -rf "$corpus"; fi
    if [ -n "$previous_src" ]; then rm -rf "$previous_src"; fi
    exit "$status"
}
trap finish EXIT

if [ "$(id -u)" = 0 ]; then
    missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        step "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # miniupnpd's package asks questions and may try to start its own
        # service; the tests never use either, they run it by hand.
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # The packaged miniupnpd service must not hold the PCP port.
    systemctl stop miniupnpd 2>/dev/null || true
    # Nor may a packaged keepalived move addresses around: the failover
    # tests run their own, one per node namespace.
    systemctl stop keepalived 2>/dev/null || true
else
    echo "!!! not root: packages not installed; namespace, nftables and capture tests will SKIP (FAIL under CI)" >&2
fi

step "formatting"
cargo fmt --all -- --check

# The etcd coordinator is a cargo feature (its client needs protoc to
# build); the suite builds and tests it, and lints both builds.
features=(--features portkeepd/etcd)
if ! command -v protoc >/dev/null 2>&1; then
    echo "!!! protoc missing: building without the etcd coordinator; its tests will SKIP (FAIL under CI)" >&2
    features=()
fi

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings

step "build"
cargo build --workspace --bins --locked "${features[@]}"

# The rolling-upgrade test (crates/portkeepd/tests/ha_pair.rs) pairs the
# previous release's portkeepd with this one. It is built from this
# checkout's history into its own target directory, kept between runs like
# target/ itself. Previous release: the last commit of link version 3 and
# the stores without the end of volatile state.
previous_release=e16d9393f86560441e1445e5605e23736dde7203
step "the previous release's portkeepd (${previous_release:0:7}), for the upgrade test"
if git cat-file -e "$previous_release^{commit}" 2>/dev/null; then
    previous_src=$(mktemp -d)
    git archive "$previous_release" | tar -x -C "$previous_src"
    CARGO_TARGET_DIR="$PWD/target/previous-release" \
        cargo build --locked -q --manifest-path "$previous_src/Cargo.toml" -p portkeepd --bin portkeepd
    rm -rf "$previous_src"
    previous_src=""
    export PORTKEEP_PREVIOUS_RELEASE="$PWD/target/previous-release/debug/portkeepd"
else
    echo "!!! $previous_release is not in this checkout's history: the upgrade test will SKIP (FAIL under CI)" >&2
fi

# The package test (crates/portkeepd/tests/package.rs) builds the Debian
# package with cargo-deb.
if [ "$(id -u)" = 0 ] && ! cargo deb --version >/dev/null 2>&1; then
    step "installing cargo-deb"
    cargo install cargo-deb --locked --quiet
fi

step "tests"
cargo test --workspace --locked --no-fail-fast "${features[@]}"

step "fuzz smoke (10 s per parser)"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --quiet
fi
corpus=$(mktemp -d)
targets=$(RUSTC_BOOTSTRAP=1 cargo fuzz list)
[ -n "$targets" ] || { echo "cargo fuzz list named no targets" >&2; exit 1; }
for target in $targets; do
    mkdir -p "$corpus/$target"
    # cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets the stable
    # toolchain accept them (docs/fuzzing.md). New inputs go to the
    # temporary corpus, never into the checked-in seeds.
    dict=()
    [ -f "fuzz/dicts/$target.dict" ] && dict=(-dict="fuzz/dicts/$target.dict")
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time=10 ${dict[@]+"${dict[@]}"} 2>&1 | tail -n 2
done

step "all tests passed"
