"""Typed options: each stage's options are dataclasses, parsed by transformers' `HfArgumentParser` (the parser
users of this stack know: `--flag`, `--no-flag`, `--name value`, and a group per dataclass), validated all at
once before any work starts.

`--help` shows one line an option; a group marked `hidden` (the speed switches kept for A/B runs) appears only
in `--help-all`. A stage's config is a dataclass whose fields are the groups (`cfg.schedule.learning_rate`), or,
for a stage with a single group, that group itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import re
import sys
import typing
from pathlib import Path


class OptionsError(SystemExit):
    """Every problem with the options at once; exits with status 2 and a readable list."""

    def __init__(self, prog: str, problems: list[str]):
        self.problems = problems
        sys.stderr.write(f"{prog}: invalid options:\n" + "".join(f"  - {p}\n" for p in problems))
        super().__init__(2)


def opt(help: str, default=dataclasses.MISSING, choices=None, default_factory=dataclasses.MISSING):
    """A dataclass field with its one line of help (and allowed values)."""
    meta = {"help": help} | ({"choices": choices} if choices else {})
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


METAVARS = {int: "N", float: "NUM", Path: "PATH", str: "TEXT"}


class OneLineHelp(argparse.RawDescriptionHelpFormatter):
    """One line an option: its dashed name only (HfArgumentParser also accepts --under_scored ones), bools as
    `--flag` or `--[no-]flag`, and the default where it says something."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=36, width=119)

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        name = next((o for o in action.option_strings if o.startswith("--") and "_" not in o),
                    action.option_strings[-1])
        if action.nargs == "?" and action.const is True:  # an HfArgumentParser bool
            return f"--[no-]{name[2:]}" if action.default is True else name
        if action.nargs == 0:
            return name
        metavar = METAVARS.get(action.type, "TEXT")
        return f"{name} {self._metavar_formatter(action, metavar)(1)[0]}"

    def _get_help_string(self, action):
        text = action.help or ""
        if action.choices is not None and len("|".join(map(str, action.choices))) > 24:
            text = f"{text}: {', '.join(map(str, action.choices))}"
        default = action.default
        if action.nargs == 0 or default in (None, "", argparse.SUPPRESS) or isinstance(default, bool):
            return text
        return f"{text} [{default}]".replace("%", "%%")

    def _metavar_formatter(self, action, default_metavar):
        if action.choices is not None and len("|".join(map(str, action.choices))) <= 24:
            return lambda size: ("|".join(map(str, action.choices)),) * size
        return lambda size: (default_metavar,) * size


def groups_of(cls) -> list:
    """The option dataclasses a stage's config is made of."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    if all(dataclasses.is_dataclass(hints[f.name]) for f in fields):
        return [hints[f.name] for f in fields]
    return [cls]


def build_parser(cls, description: str | None, show_all: bool):
    from transformers import HfArgumentParser
    parser = HfArgumentParser(groups_of(cls), description=description, formatter_class=OneLineHelp,
                              usage="%(prog)s [options]")
    hidden = {f.name for g in groups_of(cls) if getattr(g, "hidden", False) for f in dataclasses.fields(g)}
    if hidden:
        parser.add_argument("--help-all", action="help", help="also list the switches kept for A/B runs and debugging")
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = argparse.SUPPRESS  # shown with its flag as --flag/--no-flag
        elif action.dest in hidden and not show_all:
            action.help = argparse.SUPPRESS
    return parser


def parse(cls, argv: list[str] | None = None, description: str | None = None):
    """Parse argv into `cls` and run its `problems()` check, reporting every problem at once."""
    from common.errors import PipelineError
    argv = sys.argv[1:] if argv is None else argv
    check_only = "--check-args" in argv
    argv = [a for a in argv if a != "--check-args"]
    parser = build_parser(cls, description, show_all="--help-all" in argv)
    *parts, unknown = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                         return_remaining_strings=True)
    if unknown:
        parser.error(unknown_options_message(parser, unknown))
    if check_only:  # run.sh, before stage 1: the spelling of every stage's options, not yet their inputs
        raise SystemExit(0)
    cfg = parts[0] if groups_of(cls) == [cls] else cls(*parts)
    try:
        problems = cfg.problems() if hasattr(cfg, "problems") else []
    except PipelineError as err:  # e.g. a backend that cannot run here, found while checking the options
        problems = [str(err)]
    if problems:
        raise OptionsError(parser.prog, problems)
    return cfg


def unknown_options_message(parser, unknown: list[str]) -> str:
    """'unknown option --concurency (did you mean --concurrency?)', for each word argparse could not place."""
    import difflib
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and "_" not in o]
    names = [w.split("=")[0] for w in unknown if w.startswith("-")]  # the words after one are its value
    if not names:
        return f"unexpected argument{'s' if len(unknown) > 1 else ''} {' '.join(unknown)}; options start with --"
    words = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        words.append(name + (f" (did you mean {close[0]}?)" if close else ""))
    return f"unknown option{'s' if len(words) > 1 else ''} {', '.join(words)}; see --help"


def to_jsonable(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _worker_message(err: BaseException) -> str | None:
    """The original message of an error a DataLoader worker raised (torch re-raises it here with the worker's
    traceback folded into the text), else None."""
    text = str(err)
    if "in DataLoader worker process" not in text or "Original Traceback" not in text:
        return None
    last = [line for line in text.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]*(Error|Exception|Exit)\w*: ", "", last)


def run_stage(main, cls, description: str | None = None) -> None:
    """Parse the options, run main(cfg). An error the pipeline raises on purpose (a PipelineError), one raised in
    a data loader worker, running out of GPU memory or of disk space are printed as one clear line, exit 1. Loader
    workers are stopped before the process exits (common.speed.loader_exit)."""
    cfg = parse(cls, description=description)
    try:
        main(cfg)
    except Exception as err:
        message = one_line_error(err, cfg)
        if message is None:
            raise
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}\n")
        raise SystemExit(1) from None
    finally:
        from common.speed.loader_exit import stop_loader_workers
        stop_loader_workers()


def one_line_error(err: Exception, cfg=None) -> str | None:
    """The one line a stage prints for an error it expects, or None for a bug (which keeps its traceback)."""
    from common.errors import PipelineError
    worker = _worker_message(err)
    if isinstance(err, PipelineError):
        return worker or str(err)
    if type(err).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        hint = cfg.memory_hint() if hasattr(cfg, "memory_hint") else ""
        return (f"out of GPU memory ({str(err).splitlines()[0][:160]}){hint}; finished work and checkpoints "
                "are kept")
    if worker is not None:
        return f"a data loader worker failed: {worker}"
    if type(err).__name__ in ("DistBackendError", "DistNetworkError") or (
            isinstance(err, RuntimeError) and re.search(r"gloo|NCCL|Connection (closed|reset)|[Ss]ocket", str(err))):
        return (f"another rank stopped or cannot be reached ({str(err).splitlines()[0][:160]}); rerun every node: "
                "training resumes from the newest complete checkpoint")
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        # Outputs are written under temporary names, so what was finished before stays whole.
        return (f"out of disk space writing {err.filename or 'an output'} ({err.strerror}); free space and "
                "rerun: finished work is kept")
    if isinstance(err, OSError) and err.filename and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS,
                                                                   errno.EISDIR, errno.ENOTDIR):
        return f"{err.filename}: {err.strerror}; pick a folder this user can write (--work-dir), finished work is kept"
    return None
