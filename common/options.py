"""Typed options: one dataclass per stage, turned into argparse once, validated all at once.

A field's help text lives in its metadata (`opt("...")`); a field whose default is a bool becomes a
`--flag / --no-flag` pair; `choices` in the metadata restrict a value.
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
    meta = {"help": help, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls, description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        choices = f.metadata.get("choices")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        # argparse %-formats every help string: a "3%" in the text or a default is text, not a placeholder
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        if tp is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            continue
        origin = typing.get_origin(tp)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args else tp
        if typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            parser.add_argument(_flag(f.name), dest=f.name, nargs="+", type=item, default=default,
                                choices=choices, help=help_text)
            continue
        conv = base if base in (int, float, str, Path) else str
        parser.add_argument(_flag(f.name), dest=f.name, type=conv, default=default, choices=choices,
                            help=help_text)
    return parser


def parse(cls, argv: list[str] | None = None, description: str | None = None):
    """Parse argv into `cls` and run its `problems()` check, reporting every problem at once."""
    parser = build_parser(cls, description)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = cls(**vars(ns))
    from common.errors import PipelineError
    try:
        problems = cfg.problems() if hasattr(cfg, "problems") else []
    except PipelineError as err:  # e.g. a backend that cannot run here, found while checking the options
        problems = [str(err)]
    if problems:
        raise OptionsError(parser.prog, problems)
    return cfg


def to_jsonable(cfg) -> dict:
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        out[k] = str(v) if isinstance(v, Path) else v
    return out


def dumps(cfg) -> str:
    return json.dumps(to_jsonable(cfg), indent=2, sort_keys=True)


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
    a data loader worker, running out of GPU memory or of disk space are printed as one clear line, exit 1."""
    cfg = parse(cls, description=description)
    try:
        main(cfg)
    except Exception as err:
        message = one_line_error(err, cfg)
        if message is None:
            raise
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}\n")
        raise SystemExit(1) from None


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
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        # Outputs are written under temporary names, so what was finished before stays whole.
        return (f"out of disk space writing {err.filename or 'an output'} ({err.strerror}); free space and "
                "rerun: finished work is kept")
    return None
