"""Run asyncpg's own ``tests/test_pool.py`` against picopool on a real server.

    python tests/asyncpg_compat/run.py            # the installed asyncpg's tests
    python tests/asyncpg_compat/run.py --all      # also run the skip-listed tests

The test file comes from the source distribution of the *installed* asyncpg
version, downloaded by pip at run time into a cache directory
(``$PICOPOOL_CACHE_DIR``, default ``~/.cache/picopool``); it is never copied into
this repository. The tests run unmodified, through asyncpg's own ``_testbase``,
with two seams changed:

* the server: ``PGHOST``/``PGPORT``/``PGUSER``/``PGPASSWORD`` name a
  :class:`picopool.cluster.LocalCluster` primary, which is asyncpg's supported way
  of running its suite against an existing server (``_testbase`` then uses
  ``RunningCluster``);
* the pool: ``_testbase.create_pool`` (what ``self.create_pool()`` calls) and,
  inside the test module only, ``asyncpg.create_pool`` build a
  :func:`picopool.create_pool` pool instead.

Tests named in ``skips.toml`` (next to this file, each with its reason) are not
run. Any other test that fails, errors or skips makes the exit status 1.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import unittest
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
SKIPS_FILE = HERE / "skips.toml"


def load_skips(version: str) -> dict[str, str]:
    """``{"TestClass.test_name" or "TestClass": reason}``; every entry needs a reason.

    A key may start with an asyncpg version and a space (``"0.30.0 TestPool.x"``):
    that entry holds for that version only.
    """
    with SKIPS_FILE.open("rb") as f:
        data = tomllib.load(f)
    skips: dict[str, str] = {}
    for name, reason in data["skip"].items():
        if not isinstance(reason, str) or len(reason.strip()) < 10:
            raise SystemExit(f"{SKIPS_FILE}: {name} needs a reason")
        only, _, test = name.rpartition(" ")
        if not only or only == version:
            skips[test] = reason
    return skips


def cache_dir() -> Path:
    root = os.environ.get("PICOPOOL_CACHE_DIR") or Path.home() / ".cache" / "picopool"
    return Path(root)


def asyncpg_test_file(version: str) -> Path:
    """asyncpg's ``tests/test_pool.py`` for *version*, from its sdist (downloaded once)."""
    target = cache_dir() / f"asyncpg-{version}" / "test_pool.py"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
             "--no-binary", ":all:", f"asyncpg=={version}", "-d", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("asyncpg-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = tar.extractfile(f"asyncpg-{version}/tests/test_pool.py")
            if member is None:
                raise SystemExit(f"no tests/test_pool.py in {sdist.name}")
            partial = target.with_suffix(".tmp")
            partial.write_bytes(member.read())
            partial.replace(target)
    return target


def point_asyncpg_testbase_at_picopool() -> Callable[..., Any]:
    """Make ``_testbase``'s pool factory build picopool pools; return that factory."""
    from asyncpg import _testbase
    from asyncpg import pool as pg_pool

    import picopool

    def create_pool(dsn: str | None = None, *, pool_class: Any = pg_pool.Pool,
                    loop: Any = None, **kwargs: Any) -> picopool.Pool:
        if pool_class is not pg_pool.Pool:
            raise TypeError(f"picopool cannot build a {pool_class.__name__} (pool_class=)")
        pool = picopool.create_pool(dsn, **kwargs)
        # asyncpg >= 0.32's ClusterTestCase.tearDown awaits this private task
        pool._maintenance_task = None  # type: ignore[attr-defined]
        return pool

    _testbase.create_pool = create_pool
    # asyncpg's tests have no timeout of their own; a hang fails its test instead
    _testbase.TestCaseMeta.TEST_TIMEOUT = 60
    return create_pool


def iter_tests(suite: unittest.TestSuite) -> Iterator[unittest.TestCase]:
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from iter_tests(item)
        else:
            yield item


def test_key(test: unittest.TestCase) -> tuple[str, str]:
    return type(test).__name__, test.id().rsplit(".", 1)[-1]


def load_module(path: Path, create_pool: Callable[..., Any]) -> ModuleType:
    """Import the test file; its ``asyncpg.create_pool`` calls build picopool pools.

    Only the test module sees the change (its global ``asyncpg`` becomes a copy
    of the module with ``create_pool`` replaced): picopool itself builds its
    sub-pools with the real ``asyncpg.create_pool``.
    """
    import asyncpg

    spec = importlib.util.spec_from_file_location("asyncpg_test_pool", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shim = ModuleType("asyncpg")
    shim.__dict__.update(vars(asyncpg))
    shim.create_pool = create_pool  # type: ignore[attr-defined]
    module.asyncpg = shim  # type: ignore[attr-defined]
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="run the skip-listed tests too")
    parser.add_argument("-k", dest="pattern", help="run only tests whose id contains this")
    parser.add_argument("--bare", action="store_true",
                        help="run against bare asyncpg instead (a baseline), not picopool")
    args = parser.parse_args()
    # A hang dumps every stack and fails instead of stalling CI.
    faulthandler.dump_traceback_later(float(os.environ.get("ASYNCPG_COMPAT_TIMEOUT", 900)),
                                      exit=True)

    version = importlib.metadata.version("asyncpg")
    test_file = asyncpg_test_file(version)
    skips = load_skips(version)

    from picopool.cluster import LocalCluster

    with LocalCluster(replicas=0) as cluster:
        node = cluster.primary
        os.environ.update(PGHOST=node.host, PGPORT=str(node.port), PGUSER="postgres",
                          PGPASSWORD=cluster.password, PGDATABASE="postgres")
        if args.bare:
            from asyncpg import _testbase

            _testbase.TestCaseMeta.TEST_TIMEOUT = 60
            module = load_module(test_file, _testbase.create_pool)
        else:
            module = load_module(test_file, point_asyncpg_testbase_at_picopool())
        suite = unittest.defaultTestLoader.loadTestsFromModule(module)
        selected = unittest.TestSuite()
        listed: list[str] = []
        seen: set[str] = set()
        for test in iter_tests(suite):
            cls, name = test_key(test)
            key = f"{cls}.{name}"
            seen.update((cls, key))
            if args.pattern and args.pattern not in key:
                continue
            if not args.all and (key in skips or cls in skips):
                listed.append(key)
                continue
            selected.addTest(test)
        result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(selected)

    passed = (result.testsRun - len(result.failures) - len(result.errors)
              - len(result.skipped) - len(result.unexpectedSuccesses))
    absent = sorted(set(skips) - seen)
    target = "bare asyncpg" if args.bare else "picopool"
    print(f"\nasyncpg {version} tests/test_pool.py against {target}: {passed} passed, "
          f"{len(listed)} skipped (skips.toml), {len(result.failures)} failed, "
          f"{len(result.errors)} errors, {len(result.skipped)} skipped unexpectedly")
    for test, reason in result.skipped:
        print(f"  unexpected skip (not in skips.toml): {test.id()}: {reason}")
    if absent:
        print(f"  skips.toml entries not in asyncpg {version}'s file: {', '.join(absent)}")
    ok = not (result.failures or result.errors or result.skipped
              or result.unexpectedSuccesses)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
