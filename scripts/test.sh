#!/usr/bin/env bash
# Install the gateway with its test extras and run the whole suite.
# Redis and PostgreSQL tests start their own private servers on loopback when
# redis-server / PostgreSQL are installed (.ci/run installs them; so does `apt-get install
# redis-server postgresql`), and skip otherwise (they fail instead when CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e ".[test]"
exec python -m pytest -q -p no:cacheprovider "$@"
