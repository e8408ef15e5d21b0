"""The environment is the one requirements.lock describes: exact torch-family pins, every locked package
installed at its locked version, and every dependency of pyproject.toml satisfied by the lock."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TORCH_FAMILY = {"torch": "2.11.0", "torchvision": "0.26.0", "torchaudio": "2.11.0"}  # the GPU machines' versions


def _locked() -> dict[str, str]:
    """`{name: version}` of the lock's pins whose environment markers hold here."""
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not re.match(r"^[A-Za-z0-9]", line):  # hashes, comments, continuation lines
            continue
        req = Requirement(line.rstrip(" \\"))
        if req.marker is None or req.marker.evaluate(default_environment()):
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_torch_family_is_pinned_exactly() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {Requirement(d).name: str(Requirement(d).specifier) for d in deps if Requirement(d).name in TORCH_FAMILY}
    assert pinned == {name: f"=={version}" for name, version in TORCH_FAMILY.items()}
    assert {name: _locked()[name] for name in TORCH_FAMILY} == TORCH_FAMILY


def test_every_locked_package_is_installed_at_its_locked_version() -> None:
    wrong = {}
    for name, version in _locked().items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert wrong == {}, f"(locked, installed) differ; run `make clean install` or `make lock`: {wrong}"


def test_lock_satisfies_every_dependency_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = _locked()
    for dep in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in pyproject.toml but not in requirements.lock; run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={locked[name]}, outside pyproject.toml's {req.specifier}; "
            "run `make lock`"
        )
