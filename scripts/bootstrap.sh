#!/usr/bin/env bash
# Idempotent set-up: system packages (when missing), the virtualenv, and the project with its extras.
# Usage: scripts/bootstrap.sh [demo|test]     (the Makefile calls it; running it twice is cheap)
#
# As root it installs missing Debian packages itself; as another user it names them and exits 1.
# Debian is kept from starting the services it installs (policy-rc.d): the project starts its own
# Mosquitto on a free port and never uses the system one on 1883.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages each purpose needs, as "probe:package" pairs. The package counts as missing when its
# probe is a command name that is neither on PATH nor in /usr/sbin (where Debian puts daemons), or an
# absolute path (glob allowed) that matches nothing. Add packages here.
SYSTEM_DEMO=("mosquitto:mosquitto")
# tests/pgserver.py starts its own PostgreSQL; browser tests drive Debian's Chromium (never `playwright install`);
# promtool checks the /metrics text.
SYSTEM_TEST=("${SYSTEM_DEMO[@]}" "/usr/lib/postgresql/*/bin/initdb:postgresql" "chromium:chromium" "promtool:prometheus")

purpose=${1:-demo}
case "$purpose" in
  demo) wanted=("${SYSTEM_DEMO[@]}") extras="" ;;
  test) wanted=("${SYSTEM_TEST[@]}") extras="[dev,aws]" ;;
  *) echo "usage: $0 [demo|test]" >&2; exit 2 ;;
esac
say() { echo "bootstrap: $*" >&2; }

# --- Python ------------------------------------------------------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
  done
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' 2>/dev/null; then
  say "Python 3.11 (or 3.12) is required: apt-get install -y python3.11"
  exit 1
fi
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')

venv_ok() { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }

missing=()
present() {
  case "$1" in
    /*) compgen -G "$1" >/dev/null ;;
    *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] ;;
  esac
}
for pair in "${wanted[@]}"; do
  probe=${pair%%:*} pkg=${pair#*:}
  present "$probe" || missing+=("$pkg")
done
# Debian ships venv's ensurepip separately (python3.X-venv): needed only to create the virtualenv.
if ! venv_ok && ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
  missing+=("python$pyver-venv")
fi

# --- system packages ---------------------------------------------------------------------------------------
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    say "missing system packages: ${missing[*]}"
    say "install them once as root:  sudo apt-get install -y ${missing[*]}"
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    say "missing system packages: ${missing[*]}, and no apt-get here to install them; install them and retry"
    exit 1
  fi
  say "installing ${missing[*]}"
  # Keep Debian from starting the services it installs, unless the machine already has a policy of its own.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# written by fedsilo scripts/bootstrap.sh for the duration of apt-get install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- virtualenv and the project ----------------------------------------------------------------------------
if ! venv_ok; then
  say "creating .venv with $PY ($pyver)"
  rm -rf .venv
  "$PY" -m venv .venv
fi

# Reinstall only when pyproject.toml changed (by content) or more extras are wanted than were installed.
stamp=.venv/.fedsilo-bootstrap
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $purpose"
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$have" = "$want" ] || { [ "$purpose" = demo ] && [ "$have" = "${want% *} test" ]; }; then
  exit 0
fi
say "installing the project${extras:+ with $extras} into .venv"
.venv/bin/python -m pip install -q --upgrade pip
# torch first and alone, with exactly this spec: the pinned CPU build is the one pip finds locally.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".$extras"
echo "$want" >"$stamp"
