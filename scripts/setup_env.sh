# Set up the project's virtualenv; sourced by scripts/demo.sh and scripts/test.sh.
#
# - moves to the repository root,
# - creates .venv there if it is missing (with $PYTHON, default python3),
# - activates it and installs torch (pinned) and then the project with its test extras.
#
# GRADGUARD_TORCH_VERSION overrides the torch pin (default 2.13.0). On a machine without
# a GPU, point PIP_EXTRA_INDEX_URL at PyTorch's CPU-only wheel index to get the small
# CPU build of torch.
# shellcheck shell=bash

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -f .venv/bin/activate ]; then
    echo "setup: creating .venv with $("${PYTHON:-python3}" --version)"
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

echo "setup: installing into .venv (the first time downloads torch and may take minutes)"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==${GRADGUARD_TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -e ".[test]"
