"""The `radial-min` command: the checkout's cli.py under an installed name, with the same subcommands.

cli.py stays the single-file command line at the top of the checkout (`python cli.py generate ...`), outside the
package. pyproject.toml's [project.scripts] points `radial-min` here, and `main` runs that file: found beside the
package, which is where an editable install (`pip install -e .`, the README's) imports it from. A wheel installed
elsewhere has no cli.py beside it, and says so in one line.
"""

import importlib.util
import signal
import sys
from pathlib import Path

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def _interrupted(signum, frame):
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)


def quiet_interrupt():
    """Until the command starts: Ctrl-C while the modules load (a second or more) ends with one line and exit
    code 130, as it does later, not with a traceback from inside an import. Left alone if SIGINT is ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def loud_interrupt():
    """Back to Python's KeyboardInterrupt, which the command turns into the same line where it can stop cleanly."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv=None) -> int:
    if not CLI.is_file():
        print(
            f"error: radial-min runs the checkout's cli.py, which is not at {CLI}: install the checkout in "
            "editable mode (pip install -e .) or run python cli.py there",
            file=sys.stderr,
        )
        return 2
    quiet_interrupt()
    try:
        spec = importlib.util.spec_from_file_location("radial_min_cli", CLI)
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        return cli.main(argv, prog="radial-min")
    finally:
        loud_interrupt()  # (argparse's --help and --version exit before cli.main restores it)
