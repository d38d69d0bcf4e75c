#!/usr/bin/env bash
# Builds the Debian package target/debian/portkeep_VERSION-1_ARCH.deb:
# both binaries, the manual pages and completions they generate from their
# argument definitions, then cargo-deb (`cargo install cargo-deb`).
#
#   scripts/build-deb.sh [--profile NAME] [cargo deb options, e.g. --fast --output DIR]
#
# The profile defaults to release; crates/portkeepd/tests/package.rs uses
# `package-test`, which builds faster.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
if [ "${1:-}" = --profile ]; then
    profile=$2
    shift 2
fi
cargo build --locked --profile "$profile" -p portkeepd -p portkeep --bins
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
out="$target_dir/$profile/package-files"
rm -rf "$out"
"$target_dir/$profile/portkeepd" package-files "$out"
"$target_dir/$profile/portkeep" package-files "$out"
# Debian installs manual pages compressed (policy 12.1).
gzip -9n "$out"/man/*
cargo deb --locked -p portkeepd --no-build --profile "$profile" "$@"
