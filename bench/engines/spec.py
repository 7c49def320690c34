"""What a baseline child process is asked to do, passed as a JSON file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Spec:
    kind: str  # q1 | map | udf | identity
    files: list[str]
    out: str  # the output directory (Q1: result.parquet inside it)
    workers: int
    columns: list[str] | None = None
    udf_rows: int = 0
    rows_per_file: int = 0  # Polars: rows per output file, one input row group's worth

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: str) -> Spec:
        return cls(**json.loads(Path(path).read_text()))

    @property
    def result_path(self) -> Path:
        return Path(self.out) / "result.parquet"
