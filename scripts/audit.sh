#!/usr/bin/env bash
# Check that the installed dependencies are consistent (pip check), then list those that have known
# security advisories, with pip-audit.
#
# pip check runs offline: a broken requirement makes the audit exit 1 whatever pip-audit says.
# pip-audit looks every pinned package up in the PyPA advisory database (through the PyPI or OSV web
# services); it has no offline database. So the audit needs pip-audit and network access:
#   * pip-audit not installed  -> says so, how to install it, exits 0;
#   * no network               -> says the audit needs network, exits 0;
#   * otherwise                -> pip-audit's report; exit 1 when a package has a known advisory.
#
# The packages audited are those installed in the project's environment (PYTHON, default .venv/bin/python),
# as `pip list --format=freeze` pins them, without the editable mindvis itself. pip-audit may be installed
# in that environment or anywhere on PATH. Extra pip-audit options: AUDIT_ARGS="--vulnerability-service osv".
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ]; then
    PY="$(command -v python3 || true)"
fi
if [ -z "$PY" ]; then
    echo "audit: no Python found (set PYTHON=/path/to/python)" >&2
    exit 2
fi

if "$PY" -m pip check --disable-pip-version-check >"${TMPDIR:-/tmp}/mindvis-pip-check.$$" 2>&1; then
    echo "audit: pip check: every installed distribution's requirements are met"
    CHECK_RC=0
else
    echo "audit: pip check found broken requirements:"
    cat "${TMPDIR:-/tmp}/mindvis-pip-check.$$"
    CHECK_RC=1
fi
rm -f "${TMPDIR:-/tmp}/mindvis-pip-check.$$"

if "$PY" -m pip_audit --version >/dev/null 2>&1; then
    AUDIT=("$PY" -m pip_audit)
elif command -v pip-audit >/dev/null 2>&1; then
    AUDIT=(pip-audit)
else
    echo "audit: not run: pip-audit is not installed."
    echo "audit: the dependency audit needs pip-audit and network access (it queries the PyPI/OSV advisory"
    echo "audit: database; there is no offline database). Install it with '$PY -m pip install pip-audit'"
    echo "audit: on a machine with network access, then run 'make audit' again."
    exit "$CHECK_RC"
fi

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
reqs="$workdir/requirements.txt"
# name==version for every installed distribution; local version labels (torch 2.x+cpu) are not on PyPI
if ! "$PY" -m pip list --format=freeze --exclude-editable --disable-pip-version-check 2>"$workdir/pip.err" |
    sed -e 's/+[A-Za-z0-9.]*$//' >"$reqs"; then
    echo "audit: 'pip list' failed:" >&2
    cat "$workdir/pip.err" >&2
    exit 2
fi
echo "audit: checking $(grep -c '==' "$reqs") installed packages of $PY with ${AUDIT[*]}"

"${AUDIT[@]}" --requirement "$reqs" --no-deps --disable-pip --progress-spinner off --desc on \
    ${AUDIT_ARGS:-} >"$workdir/out" 2>"$workdir/err"
rc=$?
if [ "$rc" -ne 0 ] && grep -qiE "connection ?error|max retries|name resolution|temporary failure|timed? ?out|network is unreachable|no route to host|proxyerror|sslerror|could not connect|failed to establish" "$workdir/err" "$workdir/out"; then
    echo "audit: not run: pip-audit could not reach the advisory database (no network access)."
    echo "audit: the dependency audit needs network access; run 'make audit' on a connected machine."
    exit "$CHECK_RC"
fi
cat "$workdir/out"
cat "$workdir/err" >&2
if [ "$rc" -eq 0 ]; then
    echo "audit: no known advisories"
fi
[ "$rc" -eq 0 ] && rc="$CHECK_RC"
exit "$rc"
