"""Report every CLI invocation in the deploy files and any flag problem: ``cd deploy && python -m checks``."""

from __future__ import annotations

import sys
from importlib.util import find_spec

from .cli_help import CLI_MODULES, expand
from .invocations import all_invocations


def main() -> int:
    """Print each invocation (or why it was skipped), then the problems; exit 1 if any."""
    invocations, errors = expand(all_invocations())
    for inv in invocations:
        module = CLI_MODULES.get(inv.program)
        state = "skip" if module and find_spec(module) is None else "seen"
        print(f"{state}  {inv.where}: {inv.program} {' '.join(inv.args)}")
    for error in errors:
        print("error:", error)
    print(f"{len(invocations)} invocations, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
