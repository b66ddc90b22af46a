"""Shared by the benchmarks: the device line and writing one section of bench/RESULTS.md."""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_device() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def update_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) the text between <!-- section --> and <!-- /section --> in RESULTS.md."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"<!-- {section} -->\n{body.strip()}\n<!-- /{section} -->"
    pattern = re.compile(rf"<!-- {re.escape(section)} -->.*?<!-- /{re.escape(section)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def arg_value(argv: list[str], name: str, default: str) -> str:
    """The value after option `name` in a stage's argv, or default."""
    return argv[argv.index(name) + 1] if name in argv else default


def load_stage(filename: str):
    """A numbered stage script (e.g. '6_train.py', not importable by name) as a module, run from the repo root
    with `common` importable, as the stage itself runs."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    os.chdir(root)
    name = "stage_" + Path(filename).stem
    spec = importlib.util.spec_from_file_location(name, root / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
