#!/usr/bin/env bash
# Runs every check and test of the project: formatting, lints, unit and black-box tests.
# Creates .venv with Python `websockets` for the seed-client test when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import websockets' 2>/dev/null; then
  echo "== creating .venv with websockets (for the seed Python client test)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "websockets==15.0.1"
fi
export INCIDENT_STREAM_PYTHON="$PWD/.venv/bin/python"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --all-targets --locked
