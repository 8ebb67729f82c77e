"""`accel-dp` and `python -m accel_dp`: a run keeps its signals from the first moment (accel_dp/runner.py), then the
command line (accel_dp/cli.py) runs."""

import sys

from .runner import RELAY


def main() -> None:
    if sys.argv[1:2] in (["run"], ["prepare"]):  # (before the imports: a preemption in the first second is kept too)
        RELAY.listen()
    from .cli import app

    app(prog_name="accel-dp")


if __name__ == "__main__":
    main()
