#!/usr/bin/env python3
"""Regenerate requirements.lock: the exact versions and sha256 hashes of everything `factory[test,ray]` needs.

    python3 .ci/lock.py > requirements.lock

Pins what the active environment has installed (run it in the environment that made the committed
dvc.lock): the dependency closure of pyproject.toml's requirements with the `test` and `ray` extras, at
the versions installed, read with importlib.metadata. The hashes come from pip without installing anything:
`pip install --dry-run --ignore-installed --report` names the file pip would use for each pin (PyPI, or
on CI machines the local mirror and /opt/wheels for torch's CPU build) and its sha256.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = ("test", "ray")  # the tests need both: CI runs the Ray tests rather than skipping them

HEADER = """\
# requirements.lock: exact versions and sha256 hashes of every package factory and its `test` and `ray` extras need,
# for Linux x86_64, CPython 3.11 (glibc >= 2.28): the environment of the committed dvc.lock (issue 21).
# Install (from the repository root):
#   python3 -m pip install --require-hashes -r requirements.lock && python3 -m pip install --no-deps -e .
# torch is the CPU build, torch==2.13.0+cpu: its hash is the one of torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl,
# which pip finds in find-links (/opt/wheels on CI machines); elsewhere add
# --extra-index-url https://download.pytorch.org/whl/cpu (PyPI's Linux torch wheels are CUDA builds).
# One hash per package: the file pip picks on a machine like CI's; another platform or Python needs its own lock.
# Regenerate (in the environment that made dvc.lock, after changing it on purpose; pyproject.toml keeps the ranges):
#   python3 .ci/lock.py > requirements.lock
"""


def closure(extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """name -> installed version of every distribution factory with `extras` needs (factory excluded).

    factory's own requirements come from this checkout's pyproject.toml, not from the installed metadata,
    which may be another checkout's (an editable install made before an extra was added).
    """
    seen: dict[str, tuple[str, str, set[str]]] = {}

    def visit(name: str, wanted: set[str]) -> None:
        key = canonicalize_name(name)
        dist = md.distribution(name)
        if key in seen and wanted <= seen[key][2]:
            return
        seen.setdefault(key, (dist.metadata["Name"], dist.version, set()))[2].update(wanted)
        environments = [{"extra": extra} for extra in seen[key][2] | {""}]
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                visit(req.name, set(req.extras))

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [line for extra in extras for line in project["optional-dependencies"][extra]]
    for line in wanted:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            visit(req.name, set(req.extras))
    return {name: version for key, (name, version, _) in sorted(seen.items())}


def main() -> int:
    pins = closure()
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "pins.txt"
        requirements.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                        "--report", str(report), "-r", str(requirements)], check=True, stderr=subprocess.DEVNULL)
        chosen = json.loads(report.read_text())["install"]
    hashes = {}
    for item in chosen:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        digest = item["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
        if not digest:
            raise SystemExit(f"no sha256 for {name}=={version} ({item['download_info']['url']})")
        hashes[canonicalize_name(name)] = (version, digest)
    missing = {canonicalize_name(n) for n in pins} ^ set(hashes)
    if missing:
        raise SystemExit(f"pins and pip's resolution differ: {sorted(missing)}")
    out = [HEADER]
    for name, version in pins.items():
        locked, digest = hashes[canonicalize_name(name)]
        assert locked == version, (name, locked, version)
        out.append(f"{name}=={version} \\\n    --hash=sha256:{digest}\n")
    sys.stdout.write("".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
