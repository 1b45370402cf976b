"""The wheel: built from a copy of this checkout (``pip wheel --no-deps --no-build-isolation``, with the
venv's own setuptools, offline), it installs nothing top-level but ``alya`` and its dist-info: the
repository's ``migrations/`` folder ships as ``alya.migrations`` (pyproject.toml's package-dir), ``flows/``
(the example apps) stays out. Installed alone into a target folder, ``alya.migrations`` and the Alembic
scripts are found there, by ``alya.db.migrate.alembic_config`` as ``alya migrate`` uses it. No service
needed: ScriptDirectory reads the scripts without a database."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

REPO = Path(__file__).resolve().parents[2]
# what the build must not see: it writes build/ and *.egg-info into the tree it builds
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis",
                              ".alya-data")


def pip(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(REPO, src, ignore=SKIP)
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(work / "dist"), str(src))
    (built,) = (work / "dist").glob("alya-*.whl")
    yield built


def test_the_wheel_holds_alya_alone(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        top_level = zf.read(f"{dist_info}/top_level.txt").decode().split() \
            if f"{dist_info}/top_level.txt" in names else None
    assert dist_info.startswith("alya-")
    assert {n.split("/")[0] for n in names} == {"alya", dist_info}  # no flows/, no top-level migrations/
    assert top_level in (None, ["alya"])
    versions = sorted(p.name for p in (REPO / "migrations" / "versions").glob("*.py"))
    assert len(versions) >= 2  # __init__.py and at least one revision
    wanted = {"alya/py.typed", "alya/db/sql/queries.sql", "alya/migrations/__init__.py", "alya/migrations/env.py",
              "alya/migrations/script.py.mako", *(f"alya/migrations/versions/{v}" for v in versions)}
    assert wanted <= names, sorted(wanted - names)
    # every module and SQL file of the package: pyproject.toml lists alya's subpackages one by one
    source = {p.relative_to(REPO).as_posix() for p in (REPO / "alya").rglob("*")
              if p.suffix in (".py", ".sql") and "__pycache__" not in p.parts}
    assert source <= names, sorted(source - names)


def test_installed_alone_alya_finds_its_migrations(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel))
    assert {p.name for p in target.iterdir()} - {"bin"} == {"alya", wheel.name.split("-py3")[0] + ".dist-info"}
    code = """if True:
        import importlib.util, json, sys
        # the venv's editable install of this checkout would lend the wheel whatever it lacks: not here
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        import alya, alya.migrations
        from alembic.script import ScriptDirectory
        from alya.db.migrate import alembic_config
        cfg = alembic_config("postgresql://nobody@127.0.0.1:9/never-contacted")
        scripts = ScriptDirectory.from_config(cfg)
        print(json.dumps({"alya": alya.__file__, "migrations": alya.migrations.__file__,
                          "location": cfg.get_main_option("script_location"), "heads": list(scripts.get_heads()),
                          "revisions": sorted(r.revision for r in scripts.walk_revisions()),
                          "top_level": [m for m in ("migrations", "flows") if importlib.util.find_spec(m)]}))
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALYA_", "PYTHON"))}
    env["PYTHONPATH"] = str(target)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    inside = str(target.resolve()) + os.sep
    for key in ("alya", "migrations", "location"):
        assert str(Path(got[key]).resolve()).startswith(inside), (key, got[key])
    assert Path(got["location"]).resolve() == (target / "alya" / "migrations").resolve()
    repo = ScriptDirectory(str(REPO / "migrations"))
    assert got["heads"] == list(repo.get_heads()) and len(got["heads"]) == 1
    assert got["revisions"] == sorted(r.revision for r in repo.walk_revisions())
    assert got["top_level"] == []
