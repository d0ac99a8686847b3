#!/usr/bin/env bash
# The whole test suite: set up .venv with the test extras, then run pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k oracle
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh" test
cd "$root"
exec "$root/.venv/bin/python" -m pytest -p no:cacheprovider "$@"
