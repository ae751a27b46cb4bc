"""Every malformed input of `malformed_corpus` ends in a named error, a quarantine reason or a skipped-file reason,
through the real prepare stage (or config loading): never a traceback, never a silent drop. The corpus is keyed by
the importer registry, so an importer registered without malformed sources fails here."""

from __future__ import annotations

import pandas as pd
import pytest

from kneeoa.config import Config
from kneeoa.config_checks import load_config
from kneeoa.errors import KneeoaError
from kneeoa.sources.importers import IMPORTERS
from kneeoa.stages.prepare import prepare
from malformed_corpus import CLEAN, CONFIG_CASES, CORPUS, Case

TABLES = {"quarantine": "quarantine.parquet", "skipped": "skipped.parquet"}
IMPORTER_CASES = [(importer, case) for importer, cases in CORPUS.items() for case in cases]


def reads_a_source(importer: str) -> bool:
    """False for an importer that reads no files (its spec has no PATH argument, e.g. the generated phantom): it has
    nothing to be malformed and is the one documented exception to the corpus."""
    return IMPORTERS.get(importer).path_help is not None


def _prepare(importer: str, source, tmp_path):
    cfg = Config()
    cfg.data.workers, cfg.data.image_size, cfg.data.localizer = 1, 32, "profile"
    if importer == "oai":
        cfg.data.localizer = "heatmap"
    return prepare(tmp_path / "run", cfg, source=importer, path=source)


def _expect_error(case: Case, load) -> None:
    with pytest.raises(KneeoaError) as err:  # the CLI prints these as one line, exit code 2
        load()
    assert case.match in str(err.value)


def test_every_registered_importer_that_reads_a_source_has_malformed_and_clean_sources():
    readers = {name for name in IMPORTERS.names() if reads_a_source(name)}
    assert readers, "the registry lists no importer that reads a source"
    assert readers - set(CORPUS) == set(), "importers without malformed cases in tests/malformed_corpus.py"
    assert readers - set(CLEAN) == set(), "importers without a clean source in tests/malformed_corpus.py"
    assert all(CORPUS[name] for name in readers)
    assert set(CORPUS) | set(CLEAN) <= set(IMPORTERS.names()), "corpus entries for importers that are not registered"


def test_the_source_less_exception_is_only_the_phantom():
    """The exception above is declared by the spec, not listed by hand: today it covers the phantom alone."""
    assert [name for name in IMPORTERS.names() if not reads_a_source(name)] == ["phantom"]


@pytest.mark.parametrize(("importer", "case"), IMPORTER_CASES, ids=[c.name for _, c in IMPORTER_CASES])
def test_malformed_input_is_answered(importer, case, tmp_path):
    source = case.build(tmp_path / "source")
    if case.outcome == "error":
        _expect_error(case, lambda: _prepare(importer, source, tmp_path))
        return
    manifest = _prepare(importer, source, tmp_path)
    assert len(manifest) > 0  # the good part of the source still imports
    table = pd.read_parquet(tmp_path / "run" / TABLES[case.outcome])
    hits = table[table["item"].str.contains(case.item, regex=False) & table["reason"].str.contains(case.match,
                                                                                                      regex=False)]
    assert len(hits) >= 1, f"no {case.outcome} entry for {case.item!r} with {case.match!r}:\n{table.to_string()}"


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.name for c in CONFIG_CASES])
def test_malformed_config_is_a_named_error(case, tmp_path):
    assert case.outcome == "error"
    path = case.build(tmp_path / "source")
    _expect_error(case, lambda: load_config(path))
