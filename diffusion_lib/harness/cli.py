"""The command line's common ground: one-line errors with their exit codes, and key=value overrides anywhere."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from diffusion_lib.harness.config import ConfigError, split_overrides
from diffusion_lib.harness.io import EXIT_BUSY, FolderBusy, describe_os_error


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
    the OS saying no (a full disk, a read-only folder, a file in the way) or memory running out, exit code 1."""
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
        if args.debug or not out_of_memory(error):
            raise
        print(f"error: {_memory_advice(error)}", file=sys.stderr)
        return 1
