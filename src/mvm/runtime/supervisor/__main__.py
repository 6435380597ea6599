"""``python -m mvm.runtime.supervisor SPEC_JSON``: what the launcher execs."""

import sys

from mvm.runtime.launchspec import LaunchSpec
from mvm.runtime.supervisor import run_supervisor

run_supervisor(LaunchSpec.from_json(sys.argv[1]))
