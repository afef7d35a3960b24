"""Any CSV or parquet file whose columns are named by a role map (`--map user_id=uid ...` or
a JSON/YAML file), and the shared reader behind the BARS/FuxiCTR formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import yaml

from loopfm.core.files import text_separator
from loopfm.data.importers.canonical import REQUIRED_ROLES, ROLES, DataFormatError, convert, read_table


def read_mapped(
    files: Sequence[Path], roles: Mapping[str, str], *, integer_ids: bool, click_threshold: float | None = None,
    time_unit: str | None = None,
) -> pd.DataFrame:  # fmt: skip
    """The rows of every file, in file order, with the canonical column of each role added."""
    unknown = sorted(set(roles) - set(ROLES))
    missing = [r for r in REQUIRED_ROLES if r not in roles]
    if unknown or missing:
        problem = f"unknown role(s) {unknown}" if unknown else f"no column given for {missing}"
        raise DataFormatError(f"column map: {problem}; roles are {', '.join(ROLES)} (required: {', '.join(REQUIRED_ROLES)})")
    if "timestamp" in roles and "order" in roles:
        raise DataFormatError("column map: give timestamp (absolute time) or order (sequence only), not both")
    frames = []
    for path in files:
        ids = [roles[role] for role in ("user_id", "item_id")]
        table = read_table(path, list(roles.values()), sep=text_separator(path) or ",", id_columns=ids)
        frames.append(convert(table, roles, integer_ids=integer_ids, click_threshold=click_threshold, time_unit=time_unit))
    return pd.concat(frames, ignore_index=True)


def parse_map(pairs: Sequence[str], map_file: Path | None) -> dict[str, str]:
    """`role=column` pairs over a JSON or YAML file of {role: column}; the pairs win."""
    roles: dict[str, str] = {}
    if map_file is not None:
        if not map_file.is_file():
            raise DataFormatError(f"{map_file}: file not found")
        try:
            text = map_file.read_text()
            loaded = yaml.safe_load(text) if map_file.suffix in (".yaml", ".yml") else json.loads(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise DataFormatError(f"{map_file}: not a valid column map: {exc}") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise DataFormatError(f"{map_file}: expected a mapping of role: column, e.g. {{\"user_id\": \"uid\"}}")
        roles.update({str(k): v for k, v in loaded.items()})
    for pair in pairs:
        role, sep, column = pair.partition("=")
        if not sep or not role.strip() or not column.strip():
            raise DataFormatError(f"--map {pair!r}: expected role=column, e.g. user_id=uid")
        roles[role.strip()] = column.strip()
    return roles
