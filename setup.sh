#!/usr/bin/env bash
# Sets devsilo up on a Debian machine: system packages it needs (when missing,
# through apt), then a virtualenv in .venv with devsilo installed.
#   ./setup.sh         what `silo` needs to run
#   ./setup.sh --dev   also what the test suite needs
set -euo pipefail
cd "$(dirname "$0")"

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || need+=(libseccomp2)
if [ -n "$extras" ]; then
  # the test suite also runs every sandbox backend and builds test networks
  command -v runsc >/dev/null 2>&1 || need+=(runsc)
  command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)     # validates deploy/single-host/docker-compose.yml
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v git >/dev/null 2>&1 || need+=(git)                      # cloned through the egress in tests
  /usr/bin/python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)  # pip install, likewise
  command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)          # ext4-image workspaces
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)          # deploy/monitoring checked on a real one
  [ -x /usr/lib/chromium/chromium ] || need+=(chromium)              # the web app's tests run in a real browser
fi
[ -x /usr/bin/python3 ] || need+=(python3)   # the interpreter the in-sandbox helper runs on
command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing system packages with apt: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
echo "setup: installing devsilo${extras} into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import devsilo.cli.main' || { echo "setup: devsilo did not install" >&2; exit 1; }
echo "setup: done; the command line is .venv/bin/silo"
