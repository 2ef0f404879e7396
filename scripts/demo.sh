#!/usr/bin/env bash
# The demo: GradNormMonitor on a 25-layer MLP whose gradients vanish, then on the fix.
# Arguments are passed to examples/digits_monitor.py (--epochs N, --out DIR, --quick).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python examples/digits_monitor.py "$@"
