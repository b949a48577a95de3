#!/usr/bin/env bash
# asyncpg's own tests/test_pool.py against picopool under the OLDEST asyncpg that
# pyproject.toml allows (the suite runs it under the installed, newest one:
# tests/test_asyncpg_compat.py), then picopool's tests of the paths that touch
# asyncpg's pool internals (checkout and release, start-up, cancellation). A venv
# that sees the system site-packages (picopool, its test dependencies) and has only
# that asyncpg installed on top: one wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(python -c '
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
(spec,) = [d for d in deps if d.startswith("asyncpg")]
print(re.search(r">=\s*([0-9.]+)", spec).group(1))')
case "$oldest" in *.*.*) ;; *) oldest="$oldest.0" ;; esac
venv="${PICOPOOL_CACHE_DIR:-$HOME/.cache/picopool}/venv-asyncpg-$oldest"
[ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "asyncpg==$oldest"
"$venv/bin/python" -c "import asyncpg, picopool; print('asyncpg', asyncpg.__version__, 'picopool from', picopool.__file__)"
"$venv/bin/python" tests/asyncpg_compat/run.py
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_reset_elision.py \
    tests/test_execution.py tests/test_cancellation.py tests/test_pool.py tests/test_wait_queue.py
