#!/usr/bin/env bash
# Install the gateway with its test extras and run the whole suite.
# Redis and PostgreSQL tests start their own private servers on loopback when
# redis-server / PostgreSQL are installed (.ci/run installs them; so does `apt-get install
# redis-server postgresql`), and skip otherwise (they fail instead when CI=true).
# The tests spend most of their time waiting on sockets and child processes, so they run in
# GATEWAY_TEST_WORKERS parallel workers (3 by default; 0 runs them in this process, and any
# pytest arguments can follow, e.g. `scripts/test.sh -n 0 tests/test_proxy.py -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e ".[test]"
exec python -m pytest -q -p no:cacheprovider -n "${GATEWAY_TEST_WORKERS:-3}" "$@"
