"""The command line's common ground: one-line errors with their exit codes, and key=value overrides anywhere."""
from __future__ import annotations

import argparse
import resource
import signal
import sys
from typing import Callable, Sequence

from diffusion_lib.harness.config import ConfigError, split_overrides
from diffusion_lib.harness.io import EXIT_BUSY, FolderBusy, describe_os_error


# torch's import alone maps ~650 MB of address space and a tiny run ~900 MB (measured): below this limit
# (ulimit -v) torch aborts in C++ before Python could say why
MIN_ADDRESS_SPACE = 2**30


class Stopped(KeyboardInterrupt):
    """SIGTERM outside training (while puzzles are carved, say): the command ends where it is, like Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit code 2 (argparse prints the usage too)
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse flags, collecting every `key=value` into args.overrides wherever it stands."""
    rest, overrides = split_overrides(list(argv))
    args = parser.parse_args(rest)
    args.overrides += overrides
    return args


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the allocator giving up (CUDA's OutOfMemoryError, the CPU allocator's, or the
    dynamic loader failing to map a library)."""
    torch = sys.modules.get("torch")  # not imported here: loading torch may be what ran out of memory
    kinds = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))
    return isinstance(error, kinds) or any(text in str(error) for text in ("can't allocate memory", "failed to map segment"))


def _interrupt_within(error: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C or Stopped among the exceptions `error` was raised while handling, if one is."""
    while error is not None and not isinstance(error, KeyboardInterrupt):
        error = error.__context__
    return error


def _while_importing(error: BaseException) -> bool:
    """Whether `error` was raised while Python loaded a module (its traceback passes through importlib)."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        tb = tb.tb_next
    return isinstance(error, ImportError)


def _memory_advice(error: BaseException) -> str:
    """The one line for memory running out: what ran out, while doing what, and what to change."""
    what = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    if _while_importing(error):
        return (f"out of memory while loading Python modules ({type(error).__name__}: {what}); this process may not "
                "use enough memory to load torch: raise its limit (ulimit -v) or free memory")
    return f"out of memory ({what}); lower model.hidden_dim, train.batch_size or eval.batch_size"


def run_explaining_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """run(args); what the user can act on becomes one line on stderr (with --debug, the traceback):
    bad input (ConfigError) exit code 2; a folder another process holds (FolderBusy) EXIT_BUSY (75);
    the OS saying no (a full disk, a read-only folder, a file in the way) or memory running out, exit code 1.
    SIGTERM raises Stopped (a KeyboardInterrupt) until training catches it itself (stopping.StopRequest)."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY and limit < MIN_ADDRESS_SPACE:
        print(f"error: this process may map only {limit >> 20} MiB (ulimit -v), too little to load torch and train "
              f"(at least {MIN_ADDRESS_SPACE >> 20} MiB): raise the limit", file=sys.stderr)
        return 1
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return run(args)
    except (ConfigError, FolderBusy) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BUSY if isinstance(error, FolderBusy) else 2
    except OSError as error:
        if args.debug:
            raise
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError, ImportError) as error:
        stop = _interrupt_within(error)
        if stop is not None:  # a stop signal that a library's own handling turned into its error (torch's import)
            raise stop from None
        if args.debug or not out_of_memory(error):
            raise
        print(f"error: {_memory_advice(error)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
