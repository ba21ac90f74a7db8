"""The lock is the only source of versions: it covers what pyproject.toml asks for, and the environment the
tests run in is exactly what it pins (so a dependency added without `make lock`, or a venv that drifted,
fails here rather than on the next fresh machine)."""

import importlib.metadata as md
import subprocess
import sys
import sysconfig
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

LOCK = ROOT / "requirements" / "lock.txt"


def pins(path) -> dict[str, str]:
    """name -> exact version of every `name==version` line (comments and `# via` lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: {line!r} is not an exact pin; run `make lock`"
            out[canonicalize_name(name.split("[")[0])] = version.strip()
    return out


def declared() -> list[Requirement]:
    """pyproject.toml's dependencies and every extra, plus requirements/pins.in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins_in = (ROOT / "requirements" / "pins.in").read_text().splitlines()
    lines += [line.split("#", 1)[0].strip() for line in pins_in if line.split("#", 1)[0].strip()]
    return [Requirement(line) for line in lines]


def test_lock_covers_every_declared_dependency():
    locked = pins(LOCK)
    for req in declared():
        if req.marker and not req.marker.evaluate({"python_version": "3.11", "sys_platform": "linux"}):
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} is declared but not in requirements/lock.txt: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"{req} is declared but the lock pins {name}=={locked[name]}: run `make lock`"
        )


def test_environment_is_the_lock():
    locked = pins(LOCK)
    no_deps = pins(ROOT / "requirements" / "no-deps.txt")
    project = canonicalize_name(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])
    drift, unlocked = [], []
    # the venv's own site-packages, which `make install` fills: in one full run something earlier had put the
    # base interpreter's site-packages on sys.path (its colorama showed up here), which is no install of ours
    venv = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    for dist in md.distributions(path=venv):
        name = canonicalize_name(dist.metadata["Name"])
        want = locked.get(name) or no_deps.get(name)
        if name == project:
            continue
        if want is None:
            unlocked.append(name)
        elif dist.version != want:
            drift.append(f"{name} {dist.version} (lock: {want})")
    assert not unlocked, f"installed but not locked: {sorted(unlocked)}; add them to pyproject and run `make lock`"
    assert not drift, f"installed versions differ from the lock: {drift}; run `make install` in a fresh .venv"


def test_installed_dependencies_are_consistent():
    """pip's own check, except for the wheels the Makefile installs with --no-deps on purpose."""
    no_deps = set(pins(ROOT / "requirements" / "no-deps.txt"))
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
    problems = [line for line in out.splitlines() if line and canonicalize_name(line.split()[0]) not in no_deps]
    problems = [line for line in problems if not line.startswith("No broken requirements")]
    assert not problems, problems
