#!/bin/sh
# Builds the fuzz targets with libFuzzer's coverage instrumentation on a stable toolchain (what
# `cargo fuzz build -s none` does). Run:
#   ./build.sh && ./target/$(rustc -vV | sed -n 's/^host: //p')/release/tls_server -max_total_time=60
set -e
cd "$(dirname "$0")"
RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks" \
  cargo build --release --bins --target "$(rustc -vV | sed -n 's/^host: //p')"
# (--target keeps the instrumentation flags off build scripts, which run on the host.)
