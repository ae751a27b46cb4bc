"""Every malformed input of `malformed_corpus` ends in a named error, a quarantine reason or a skipped-file reason,
through the real prepare stage (or config loading): never a traceback, never a silent drop."""

from __future__ import annotations

import pandas as pd
import pytest

from kneeoa.config import Config
from kneeoa.config_checks import load_config
from kneeoa.errors import KneeoaError
from kneeoa.stages.prepare import prepare
from malformed_corpus import CASES, Case

TABLES = {"quarantine": "quarantine.parquet", "skipped": "skipped.parquet"}


def _run(case: Case, tmp_path):
    source = case.build(tmp_path / "source")
    if case.importer == "config":
        return load_config(source)
    cfg = Config()
    cfg.data.workers, cfg.data.image_size, cfg.data.localizer = 1, 32, "profile"
    if case.importer == "oai":
        cfg.data.localizer = "heatmap"
    return prepare(tmp_path / "run", cfg, source=case.importer, path=source)


def test_every_importer_has_cases():
    assert {c.importer for c in CASES} == {"folders", "csv", "oai", "config"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input_is_answered(case, tmp_path):
    if case.outcome == "error":
        with pytest.raises(KneeoaError) as err:  # the CLI prints these as one line, exit code 2
            _run(case, tmp_path)
        assert case.match in str(err.value)
        return
    manifest = _run(case, tmp_path)
    assert len(manifest) > 0  # the good part of the source still imports
    table = pd.read_parquet(tmp_path / "run" / TABLES[case.outcome])
    hits = table[table["item"].str.contains(case.item, regex=False) & table["reason"].str.contains(case.match,
                                                                                                      regex=False)]
    assert len(hits) >= 1, f"no {case.outcome} entry for {case.item!r} with {case.match!r}:\n{table.to_string()}"
