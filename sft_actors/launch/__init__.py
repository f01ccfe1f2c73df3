"""``sft launch``: start a topology's nodes on their hosts over ssh, stop them, collect the run.

- :mod:`.placement` (pure): the node processes, one per (host, role), in start order;
- :mod:`.remote` (pure): ssh argv and remote shell lines, every value quoted;
- :mod:`.shipping` (pure): what each host receives (checkout, topology, its own keys);
- :mod:`.transfer`: tar streams over ssh and local copies, out and back;
- :mod:`.nodes`: start, watch and stop the nodes (signals, grace, logs);
- :mod:`.outcome` (pure): the launch's status and exit code;
- :mod:`.launcher`: one launch, start to end.
"""

from sft_actors.launch.launcher import (
    LaunchOptions,
    LaunchPlan,
    LaunchReport,
    describe,
    dry_run,
    launch,
    plan_launch,
    run_launch,
)
from sft_actors.launch.outcome import EXIT_CONFIG, EXIT_FAILED, EXIT_FORCED, EXIT_OK, LaunchOutcome
from sft_actors.launch.procs import LaunchConfigError, LaunchError

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_FORCED",
    "EXIT_OK",
    "LaunchConfigError",
    "LaunchError",
    "LaunchOptions",
    "LaunchOutcome",
    "LaunchPlan",
    "LaunchReport",
    "describe",
    "dry_run",
    "launch",
    "plan_launch",
    "run_launch",
]
