"""Typed options: one dataclass per stage, turned into argparse once, validated all at once.

A field's help text lives in its metadata (`opt("...")`); a field whose default is a bool becomes a
`--flag / --no-flag` pair; `choices` in the metadata restrict a value.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
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
    problems = cfg.problems() if hasattr(cfg, "problems") else []
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


def run_stage(main, cls, description: str | None = None) -> None:
    """Parse the options, run main(cfg); a PipelineError is printed as one clear line, exit status 1."""
    from common.errors import PipelineError
    cfg = parse(cls, description=description)
    try:
        main(cfg)
    except PipelineError as err:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {err}\n")
        raise SystemExit(1) from None
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        # Outputs are written under temporary names, so what was finished before stays whole.
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: out of disk space writing "
                         f"{err.filename or 'an output'} ({err.strerror}); free space and rerun: "
                         "finished work is kept\n")
        raise SystemExit(1) from None
