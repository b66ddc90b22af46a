"""One of N slices of the catalog, for running the data stages on N machines at once (`--part I/N`).

A row belongs to part I when a stable hash of its sample_id, modulo N, is I: the same split on every machine and
every rerun, whatever the row order. Per-sample outputs (images, encoded samples) go to the shared folders as in
a one-part run; what describes a whole folder gets the part's suffix (`manifest.part-0-of-4.csv`,
`stats.part-0-of-4.json`, stage 5's `index.part-0-of-4.json` and `train-part-0-of-4-shard-000000.tar`), and
`5_convert.py --merge-parts` joins the parts' indexes into the index.json training reads. Temporary files a part
cleans up are its own rows' only, so parts can share a folder while they run.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from common.errors import PipelineError

PATTERN = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Part:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Part":
        match = PATTERN.match(text.strip())
        if not match or not int(match.group(1)) < int(match.group(2)):
            raise PipelineError(f"--part {text}: give I/N with 0 <= I < N, e.g. 0/4")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def suffix(self) -> str:
        """'' for the whole catalog, else '.part-I-of-N' (file names of what describes this part)."""
        return "" if self.whole else f".part-{self.index}-of-{self.count}"

    def has(self, sample_id: str) -> bool:
        return self.whole or int(hashlib.sha1(sample_id.encode()).hexdigest()[:12], 16) % self.count == self.index

    def rows(self, frame):
        """The rows of a catalog DataFrame that belong to this part."""
        return frame if self.whole else frame[frame["sample_id"].map(self.has)].reset_index(drop=True)


def part_problems(text: str) -> list[str]:
    try:
        Part.parse(text)
    except PipelineError as err:
        return [str(err)]
    return []
