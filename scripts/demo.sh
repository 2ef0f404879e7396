#!/usr/bin/env bash
# The demo: vanishing gradients, exploding gradients and dying ReLUs on the digits data,
# each trained without and with GradGuard (`gradguard demo`). Arguments go to the command
# (--out DIR, --only SCENARIO, --wandb online|offline|disabled, --quick); see --help.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
gradguard demo "$@"
