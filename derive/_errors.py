"""Errors and exit codes shared by the command-line tools (python -m derive, python -m validation).

Exit codes: 0 ok, 1 a verification failed, 2 bad input (one line ``file: key: problem``),
3 an internal error (one line naming the stage; ``GDDIM_DEBUG=1`` adds the traceback).
"""

import contextlib
import os
import sys
import traceback

EXIT_OK, EXIT_VERIFICATION, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class SpecError(Exception):
    """A problem with user input (spec file, option, table file). Printed as one line; exit 2."""

    def __init__(self, where, key, problem):
        self.where, self.key, self.problem = str(where), str(key), str(problem)
        super().__init__(f"{self.where}: {self.key}: {self.problem}")

    def __reduce__(self):                  # picklable across worker processes
        return (SpecError, (self.where, self.key, self.problem))


class VerificationFailed(Exception):
    """A table failed its check before writing (or a requested verification); exit 1."""


class InternalError(Exception):
    """An unexpected failure inside a stage of the tool (a bug, not the user's input); exit 3."""

    def __init__(self, stage, what):
        self.stage, self.what = str(stage), str(what)
        super().__init__(f"internal error in {self.stage}: {self.what}")

    def __reduce__(self):
        return (InternalError, (self.stage, self.what))


_EXPECTED = (SpecError, VerificationFailed, InternalError, KeyboardInterrupt, SystemExit)


@contextlib.contextmanager
def stage(name):
    """Name the stage of any unexpected exception raised inside (kept as ``__cause__``)."""
    try:
        yield
    except _EXPECTED:
        raise
    except BaseException as exc:
        raise InternalError(name, f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc


def run_cli(main, argv, stage_name):
    """Call ``main(argv)`` and turn every outcome into an exit code with at most one stderr line.

    ``stage_name`` names failures raised outside any ``stage`` block. The traceback of an
    internal error is printed only with GDDIM_DEBUG=1 in the environment.
    """
    try:
        with stage(stage_name):
            return main(argv)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except VerificationFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_VERIFICATION
    except KeyboardInterrupt:
        print("interrupted; files already written are complete, others untouched", file=sys.stderr)
        return 130
    except InternalError as exc:
        if os.environ.get("GDDIM_DEBUG", "") not in ("", "0"):
            traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
        what = exc.what.splitlines()[0] if exc.what else "unknown"
        print(f"internal error in {exc.stage}: {what}; rerun with GDDIM_DEBUG=1 for the traceback",
              file=sys.stderr)
        return EXIT_INTERNAL
