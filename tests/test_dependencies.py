"""Dependencies: declared with lower bounds, and audited.

``scripts/audit.sh`` (``make audit``) runs ``pip check`` (offline), then pip-audit when it is available, and
says clearly that the advisory audit needs network when it cannot run. Its branches are tested with a stand-in ``pip_audit`` module, so the
tests never reach the network and never install anything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AUDIT = ROOT / "scripts" / "audit.sh"


def _pip_available() -> bool:
    res = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
    return res.returncode == 0


def _requirements() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {"dependencies": list(project.get("dependencies", []))}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        groups[f"optional-dependencies.{extra}"] = list(reqs)
    return groups


def test_every_dependency_has_a_lower_bound_and_no_pin():
    from packaging.requirements import Requirement

    problems = []
    for group, reqs in _requirements().items():
        for text in reqs:
            req = Requirement(text)
            ops = {s.operator for s in req.specifier}
            if not ops & {">=", "~=", ">"}:
                problems.append(f"{group}: {text!r} has no lower bound")
            if ops & {"==", "==="}:
                problems.append(f"{group}: {text!r} pins an exact version")
    assert not problems, "\n".join(problems)


def test_installed_versions_meet_the_bounds():
    """The installed runtime and dev dependencies satisfy what pyproject.toml declares (a stale environment
    or a bound raised without reinstalling shows up here)."""
    from packaging.requirements import Requirement

    problems = []
    groups = _requirements()
    for group in ("dependencies", "optional-dependencies.dev"):
        for text in groups.get(group, []):
            req = Requirement(text)
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{group}: {req.name} is not installed")
                continue
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{group}: {req.name} {version} does not satisfy {req.specifier}")
    assert not problems, "\n".join(problems)


# ---- scripts/audit.sh -----------------------------------------------------------------------------------------


FAKE_AUDIT = """
import sys
from pathlib import Path

args = sys.argv[1:]
if args == ["--version"]:
    print("pip-audit 0.0 (stand-in)")
    sys.exit(0)
reqs = Path(args[args.index("--requirement") + 1]).read_text()
Path({log!r}).write_text(" ".join(args) + "\\n" + reqs)
mode = {mode!r}
if mode == "offline":
    print("requests.exceptions.ConnectionError: HTTPSConnectionPool(host='pypi.org', port=443): Max retries "
          "exceeded (Caused by NameResolutionError)", file=sys.stderr)
    sys.exit(1)
if mode == "vulnerable":
    print("Name    Version ID             Fix Versions")
    print("example 1.0     PYSEC-0000-000 1.1")
    print("Found 1 known vulnerability in 1 package", file=sys.stderr)
    sys.exit(1)
print("No known vulnerabilities found")
"""


def _run_audit(tmp_path: Path, mode: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AUDIT_ARGS")}
    log = tmp_path / "audit_args.txt"
    if mode is not None:  # a stand-in pip_audit module, importable by the environment's Python
        pkg = tmp_path / "fake" / "pip_audit"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "__main__.py").write_text(FAKE_AUDIT.format(log=str(log), mode=mode))
        env["PYTHONPATH"] = str(tmp_path / "fake")
    # no real pip-audit on PATH: only the system tools the script uses
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("mktemp", "rm", "sed", "grep", "cat", "dirname", "env"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    env["PATH"] = str(bindir)
    env["PYTHON"] = sys.executable
    res = subprocess.run(
        [shutil.which("bash"), str(AUDIT)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    return res, log


def test_audit_without_pip_audit_says_it_needs_network(tmp_path):
    res, _ = _run_audit(tmp_path, None)
    if "pip-audit 0.0" in res.stdout:  # pragma: no cover - a real pip_audit in the environment
        pytest.skip("pip-audit is installed in this environment")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "pip-audit is not installed" in res.stdout and "network" in res.stdout
    assert "pip check: every installed distribution's requirements are met" in res.stdout  # offline part


def test_audit_offline_says_it_needs_network(tmp_path):
    res, log = _run_audit(tmp_path, "offline")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "needs network" in res.stdout
    assert log.is_file()


def test_audit_reports_advisories_and_fails(tmp_path):
    res, log = _run_audit(tmp_path, "vulnerable")
    assert res.returncode == 1
    assert "PYSEC-0000-000" in res.stdout
    args, *lines = log.read_text().splitlines()
    assert "--no-deps" in args and "--disable-pip" in args
    pinned = [ln for ln in lines if ln.strip()]
    assert pinned and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^+\s]+", ln) for ln in pinned), pinned[:5]
    assert not any(ln.lower().startswith("mindvis==") for ln in pinned)  # the editable project itself
    names = {ln.split("==")[0].lower() for ln in pinned}
    assert "numpy" in names


def test_audit_clean(tmp_path):
    res, _ = _run_audit(tmp_path, "clean")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no known advisories" in res.stdout
