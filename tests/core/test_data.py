import pytest

from harness import data
from harness.errors import HarnessError


def test_split_is_fixed_and_disjoint():
    train, calib, ev = (set(data.plays(s)) for s in ("train", "calibration", "eval"))
    assert ev == set(data.EVAL_PLAYS)
    assert calib == set(data.CALIBRATION_PLAYS)
    assert not (train & ev) and not (train & calib) and not (calib & ev)
    assert len(train) + len(calib) + len(ev) == 42


def test_folio_duplicates_and_other_authors_excluded():
    names = data.play_names()
    assert not any(n.endswith("_f") for n in names)
    assert "paradise_lost_(no_introduction)" not in names


def test_eval_text_never_appears_in_training_text():
    train = data.split_text("train")
    hamlet_line = "To be, or not to be"
    assert hamlet_line in data.split_text("eval")
    assert hamlet_line not in train


def test_token_blocks_deterministic(tiny):
    _, tok = tiny
    a = data.token_blocks(tok, "calibration", 64, 5, seed=3)
    b = data.token_blocks(tok, "calibration", 64, 5, seed=3)
    c = data.token_blocks(tok, "calibration", 64, 5, seed=4)
    assert a.shape == (5, 64) and (a == b).all() and not (a == c).all()


def test_unknown_split():
    with pytest.raises(HarnessError, match="unknown split"):
        data.plays("dev")
