#!/usr/bin/env bash
# The test command: builds (once) a virtual environment with the pinned CPU test stack, then runs
# ruff and pytest. Usage: bash tests/run.sh [pytest args]. TRAINER_TEST_VENV picks the venv folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TRAINER_TEST_VENV:-.venv-test}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
NEEDED="torch ldm open_clip transformers pytest gradio fastapi httpx ruff lycoris hypothesis cv2 skimage lion_pytorch prodigyopt schedulefree playwright accelerate"
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in '$NEEDED'.split()))" 2>/dev/null; then
  echo "== installing the test stack into $VENV (CPU torch first, then the pinned packages)"
  "${PIP[@]}" "setuptools==80.9.0"
  # CPU torch: a plain 'torch' requirement would pull the CUDA build (GBs). An already installed torch >= 2.1 is kept.
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0" ${TRAINER_TORCH_INDEX:+--index-url "$TRAINER_TORCH_INDEX"}
  "${PIP[@]}" -c tests/constraints.txt -r tests/requirements.txt
  # ldm, the classes the WebUI runs for SD1/SD2; its own requirement pins are ancient, hence --no-deps.
  "${PIP[@]}" --no-deps "stable-diffusion-sdkit==2.1.5"
fi

# the browser test needs a Chromium: Debian's package where we may install it (root, apt); skipped otherwise.
# TRAINER_BROWSER=0 leaves it out.
if [ "${TRAINER_BROWSER:-1}" != 0 ] && [ ! -x /usr/lib/chromium/chromium ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Chromium (Debian package) for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
      >/dev/null) || echo "== Chromium could not be installed; the browser test will be skipped"
  fi
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
"$VENV/bin/python" -m ruff check .
"$VENV/bin/python" -m ruff format --check .
"$VENV/bin/python" -m pytest "$@"
