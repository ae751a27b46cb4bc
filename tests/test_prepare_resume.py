"""A film import killed part-way continues where it stopped when the same prepare is run again."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from kneeoa.config import Config
from kneeoa.localize import films
from kneeoa.runfolder.manifest import PREPARE_JOURNAL
from kneeoa.stages.prepare import prepare
from kneeoa.synthetic.phantom.films import write_phantom_release

FILMS, KILLED_AT = 4, 2  # the first run dies when it reaches film KILLED_AT + 1


class Killed(BaseException):
    """Stands for kill -9: not an Exception, so nothing on the way catches it."""


def test_a_killed_film_import_resumes_with_the_films_not_yet_done_and_equals_a_clean_one(tmp_path, monkeypatch,
                                                                                         caplog):
    release = tmp_path / "release"
    write_phantom_release(release, patients=FILMS, visits=1, seed=3, spacings_mm=(0.6,), workers=1)
    cfg = Config()
    cfg.data.workers = 1
    clean = prepare(tmp_path / "clean", cfg, source="oai", path=release)

    real, seen = films.process_film, []

    def dies_part_way(job):
        if len(seen) == KILLED_AT:
            raise Killed
        seen.append(job.path)
        return real(job)

    run = tmp_path / "run"
    monkeypatch.setattr(films, "process_film", dies_part_way)
    with pytest.raises(Killed):
        prepare(run, cfg, source="oai", path=release)
    assert not (run / "manifest.parquet").exists()
    assert len(list((run / PREPARE_JOURNAL / "films").glob("*.pkl"))) == KILLED_AT

    seen.clear()
    monkeypatch.setattr(films, "process_film", lambda job: seen.append(job.path) or real(job))
    with caplog.at_level(logging.WARNING, logger="kneeoa.localize.films"):
        resumed = prepare(run, cfg, source="oai", path=release)
    assert len(seen) == FILMS - KILLED_AT  # only the films the killed run had not finished
    assert f"resuming: {KILLED_AT} of {FILMS} films already processed" in caplog.text
    assert not (run / PREPARE_JOURNAL).exists()  # complete: the record is gone
    pd.testing.assert_frame_equal(resumed.reset_index(drop=True), clean.reset_index(drop=True))


@pytest.mark.parametrize("change", ["crop size", "crop deleted"])
def test_a_recorded_film_is_processed_again_when_its_setting_changed_or_its_crop_is_gone(change, tmp_path,
                                                                                          monkeypatch):
    release = tmp_path / "release"
    write_phantom_release(release, patients=2, visits=1, seed=4, spacings_mm=(0.6,), workers=1)
    cfg = Config()
    cfg.data.workers = 1
    run = tmp_path / "run"
    real, seen = films.process_film, []

    def second_dies(job):
        seen.append(job.path)
        if len(seen) == 2:
            raise Killed
        return real(job)

    monkeypatch.setattr(films, "process_film", second_dies)
    with pytest.raises(Killed):
        prepare(run, cfg, source="oai", path=release)
    assert len(list((run / PREPARE_JOURNAL / "films").glob("*.pkl"))) == 1
    if change == "crop size":
        cfg.data.crop_mm = 120.0
    else:
        for crop in (run / "crops").glob("*.png"):
            crop.unlink()
    seen.clear()
    monkeypatch.setattr(films, "process_film", lambda job: seen.append(job.path) or real(job))
    prepare(run, cfg, source="oai", path=release)
    assert len(seen) == 2
