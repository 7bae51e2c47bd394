"""The ``imprune`` command line: a registry of subcommands filled by the ``@command`` decorator.

Each subcommand is a function ``run(args) -> int`` registered with its arguments, in a module listed in
``_COMMAND_MODULES`` (imported lazily, so ``imprune --help`` stays fast). Errors the user can fix are
``ImpruneError``: one line on stderr and exit code 2, never a traceback, never a half-written output.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from importance.errors import ImpruneError
from pruning.methods.registry import Arg, arg

# shared arguments, so every command spells them the same way
MODEL = arg("--model", default="builtin:smollm2-135m",
            help="builtin:smollm2-135m | builtin:minilm-l6 | random:<model_type> | folder | .gguf | hub id")
DTYPE = arg("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
DEVICE = arg("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
MAX_MEMORY = arg("--max-memory", default=None,
                 help="cap on --device memory, e.g. 200MiB or 0=20GiB,cpu=64GiB: accelerate offloads the rest "
                      "(CPU, then disk) and streams it in per module")
TRUST = arg("--trust-remote-code", action="store_true", help="allow model code from the model folder (off)")
ALLOW_PICKLE = arg("--allow-pickle", action="store_true",
                   help="load a model folder whose weights are only a pickle (pytorch_model.bin), with "
                        "torch.load(weights_only=True); off: such a folder is refused")
SEQ_LEN = arg("--seq-len", type=int, default=256, help="window length in tokens")
TOKENS = arg("--tokens", type=int, default=None, help="cap on tokens (whole windows)")
SAMPLES = arg("--samples", type=int, default=None, help="cap on windows")
SEED = arg("--seed", type=int, default=0)
BATCH = arg("--batch-size", type=int, default=4, help="windows per forward pass")
OVERWRITE = arg("--overwrite", action="store_true", help="replace an existing output")
QUIET = arg("--quiet", action="store_true", help="no progress bars")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    args: tuple[Arg, ...]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
_COMMAND_MODULES = ("pruning.cli.scoring", "pruning.cli.prune", "pruning.cli.validate", "pruning.cli.run",
                    "pruning.cli.quant", "pruning.cli.viz", "pruning.cli.heal")


def command(name: str, help: str, args: Sequence[Arg] = ()) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Register ``fn(args) -> int`` as ``imprune <name>``."""

    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, tuple(args), fn)
        return fn

    return register


def check_output(path: str | Path, overwrite: bool, *, kind: Literal["dir", "file"] = "dir",
                 protect: Mapping[str, Any] | None = None, flag: str = "--out") -> Path:
    """Every check on an output before any work is done (``importance.store.outputs.check_target``): an existing
    one is refused unless ``--overwrite``, and even then unless imprune wrote it and it is none of ``/``, the
    home or current folder (or a parent of it), an input in ``protect`` ({"--model": spec, ...}) or a parent of
    one; ``kind`` says whether a folder or a file is written; the place must be writable."""
    from importance.store.outputs import check_target

    return check_target(path, overwrite, kind=kind, protect=protect, flag=flag)


def positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ImpruneError(f"{flag} must be at least 1, got {value}")


class _Parser(argparse.ArgumentParser):
    """argparse, with two changes: a value that starts with '-' and a digit (``--nm -2:4``, ``--sparsity -1e-3``)
    is a value for our own checks to judge, not an unknown option; and a usage error is one line, like ours."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    for mod in _COMMAND_MODULES:
        importlib.import_module(mod)
    parser = _Parser(prog="imprune", description="Which parts of a transformer matter, and "
                     "what to do about it: score, draw, prune, quantize, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for flags, kwargs in cmd.args:
            p.add_argument(*flags, **kwargs)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # accelerate warns "Some parameters are on the meta device ..." on every --max-memory load, as asked for
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    try:  # datasets prints "Generating train split" bars for csv / json / parquet files
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the raw command line, for commands that relaunch themselves (score --processes)
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return COMMANDS[args.command].run(args)
    except ImpruneError as err:
        print(f"imprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`imprune info | head`): stop quietly, as a shell tool does
        _silence_stdout()
        return 141  # 128 + SIGPIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
