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


def test_split_ids_are_tokenized_once_per_tokenizer_definition(tiny, monkeypatch, tmp_path):
    """Two loads of one tokenizer share the memo; a tokenizer with another vocabulary does not,
    and the blocks cut from the memo are copies, so a caller cannot corrupt it."""
    import copy

    from tokenizers import AddedToken

    _, tok = tiny
    monkeypatch.setattr(data, "_SPLIT_IDS", {})
    monkeypatch.setattr(data, "tokens_cache_dir", lambda: tmp_path)
    calls = []
    real = data.tokenize
    monkeypatch.setattr(data, "tokenize", lambda t, text: calls.append(t) or real(t, text))
    first = data.split_ids(tok, "calibration")
    assert first.tolist() == real(tok, data.split_text("calibration")).tolist()
    again = copy.deepcopy(tok)  # a second load: another object, the same definition
    assert data.split_ids(again, "calibration") is first and len(calls) == 1
    blocks = data.token_blocks(again, "calibration", 64, 2)
    blocks.zero_()
    assert data.split_ids(tok, "calibration").equal(first) and first.any()
    other = copy.deepcopy(tok)
    other.add_tokens([AddedToken("Caesar", single_word=True)])  # tokenizes the play otherwise
    ids = data.split_ids(other, "calibration")
    assert len(calls) == 2 and ids.numel() != first.numel()


def test_split_ids_are_read_back_from_the_token_cache(tiny, monkeypatch, tmp_path):
    """Another process (an empty memo) reads the ids the first one wrote instead of tokenizing;
    a torn file is tokenized again and replaced; another tokenizer writes its own file."""
    import copy

    from tokenizers import AddedToken

    _, tok = tiny
    monkeypatch.setattr(data, "tokens_cache_dir", lambda: tmp_path)
    calls = []
    real = data.tokenize
    monkeypatch.setattr(data, "tokenize", lambda t, text: calls.append(t) or real(t, text))
    monkeypatch.setattr(data, "_SPLIT_IDS", {})
    first = data.split_ids(tok, "calibration")
    [cached] = tmp_path.iterdir()
    monkeypatch.setattr(data, "_SPLIT_IDS", {})  # a new process
    again = data.split_ids(tok, "calibration")
    assert len(calls) == 1 and again is not first and again.equal(first)

    cached.write_bytes(cached.read_bytes()[:50])  # a write cut short
    monkeypatch.setattr(data, "_SPLIT_IDS", {})
    assert data.split_ids(tok, "calibration").equal(first) and len(calls) == 2
    monkeypatch.setattr(data, "_SPLIT_IDS", {})
    assert data.split_ids(tok, "calibration").equal(first) and len(calls) == 2  # mended

    other = copy.deepcopy(tok)
    other.add_tokens([AddedToken("Caesar", single_word=True)])
    assert data.split_ids(other, "calibration").numel() != first.numel()
    assert len(calls) == 3 and len(list(tmp_path.glob("calibration-*.safetensors"))) == 2
