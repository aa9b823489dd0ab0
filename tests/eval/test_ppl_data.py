"""Perplexity data sets: parsing, metric names, files, and the standard sets read offline from
small caches built in the Hugging Face caches' own layouts (tests/helpers/hf_cache.py)."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import random
import subprocess
import sys

import pytest
import torch

from harness import data
from harness.errors import HarnessError
from harness.eval import ppl_data
from harness.eval.ppl_data import (
    DEFAULT,
    SHAKESPEARE,
    check_available,
    label,
    load_ids,
    metric_name,
    parse_ppl_data,
    read_text_file,
)
from tests.helpers.hf_cache import build_hf_cache, build_hub_file

WIKITEXT_FILL = ("HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 python -c \"import datasets; "
                 "datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', split='test')\"")
C4_FILL = ("HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 python -c \"import datasets; "
           "datasets.load_dataset('allenai/c4', data_files={'validation': "
           "'en/c4-validation.00000-of-00008.json.gz'}, split='validation')\"")
TEXTS = [" = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 : Unrecorded Chronicles "
         "is a tactical role @-@ playing video game .\n", " It met with positive sales in Japan .\n"]


def _one_line_error(call, *args) -> str:
    with pytest.raises(HarnessError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def tok(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def bos_tok(tiny):
    """The tiny tokenizer adding a BOS by default, like Llama's: tells `tokenizer(text)` (the
    reference scripts) from `harness.data.tokenize` (no special tokens)."""
    from tokenizers import processors

    tok = copy.deepcopy(tiny[1])
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)])
    assert tok("a b")["input_ids"][0] == tok.bos_token_id
    return tok


# --- parsing ---------------------------------------------------------------------------------

def test_names_are_canonical_deduplicated_and_ordered():
    assert parse_ppl_data("WikiText2, c4,shakespeare,c4") == ("wikitext2", "c4", "shakespeare")
    assert parse_ppl_data(["ptb", "wikitext2,c4", "ptb"]) == ("ptb", "wikitext2", "c4")
    assert parse_ppl_data(DEFAULT) == (SHAKESPEARE,) == DEFAULT


def test_hf_entries_get_their_defaults_written_out():
    entries = parse_ppl_data("hf:wikitext:wikitext-103-raw-v1,hf:wikitext:wikitext-103-raw-v1:test:text,"
                             "hf:org/corpus::validation:body")
    assert entries == ("hf:wikitext:wikitext-103-raw-v1:test:text", "hf:org/corpus::validation:body")


@pytest.mark.parametrize("value, expected", [
    ("", "no ppl data given"),
    (" , ", "no ppl data given"),
    ([], "no ppl data given"),
    ("wikitxt2", "did you mean 'wikitext2'?"),
    ("c5", "hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]"),
    ("hf:", "is not a Hugging Face dataset id"),
    ("hf:a/b/c", "is not a Hugging Face dataset id"),
    ("hf:ds:cfg:test:text:extra", "more than 4"),
    ("hf:ds:c fg", "bad config"),
    ("missing/notes.txt", "does not exist"),
])
def test_bad_entries_are_one_line_errors(value, expected):
    message = _one_line_error(parse_ppl_data, value)
    assert expected in message


def test_unknown_name_lists_the_valid_forms():
    message = _one_line_error(parse_ppl_data, "wikitext")
    assert "did you mean 'wikitext2'?" in message
    for form in ("shakespeare", "wikitext2", "c4", "ptb", ".jsonl", ".parquet", "hf:DATASET"):
        assert form in message


def test_other_suffixes_and_folders_are_refused(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    assert "unsupported suffix '.csv'" in _one_line_error(parse_ppl_data, str(tmp_path / "notes.csv"))
    assert "is a folder" in _one_line_error(parse_ppl_data, str(tmp_path))


def test_file_entry_is_absolute_path_and_content_digest(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    path.write_text("first version")
    monkeypatch.chdir(tmp_path)
    (entry,) = parse_ppl_data("notes.txt")
    digest = hashlib.sha256(b"first version").hexdigest()[:16]
    assert entry == f"file:{path.resolve()}@{digest}"
    assert parse_ppl_data(str(path)) == (entry,)
    path.write_text("second version")
    (edited,) = parse_ppl_data("notes.txt")
    assert edited != entry and edited.startswith(f"file:{path.resolve()}@")


def test_canonical_file_entry_is_kept_without_the_file():
    entry = "file:/elsewhere/eval set.jsonl@0123456789abcdef"
    assert parse_ppl_data([entry, "c4"]) == (entry, "c4")
    assert metric_name(entry) == "ppl_eval_set" and label(entry) == "eval set.jsonl"


def test_metric_names():
    assert [metric_name(e) for e in ("shakespeare", "wikitext2", "c4", "ptb")] == [
        "ppl", "ppl_wikitext2", "ppl_c4", "ppl_ptb"]
    assert metric_name("file:/x/My Notes-2.TXT@0123456789abcdef") == "ppl_my_notes_2"
    assert metric_name("hf:Salesforce/wikitext:wikitext-103-raw-v1:test:text") == \
        "ppl_wikitext_wikitext_103_raw_v1"
    assert metric_name("hf:org/Corpus.v2::validation:body") == "ppl_corpus_v2"


def test_entries_under_one_metric_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "notes.jsonl").write_text('{"text": "x"}\n')
    message = _one_line_error(parse_ppl_data, [str(tmp_path / "a" / "notes.txt"),
                                               str(tmp_path / "notes.jsonl")])
    assert "both report as ppl_notes" in message
    message = _one_line_error(parse_ppl_data, "hf:x:c:test,hf:x:c:validation")
    assert "both report as ppl_x_c" in message
    # A user text must not report under a standard set's metric, even alone.
    (tmp_path / "c4.txt").write_text("x")
    assert "the standard c4 evaluation" in _one_line_error(parse_ppl_data, str(tmp_path / "c4.txt"))


def test_labels():
    assert label("shakespeare") == "Shakespeare held-out plays"
    assert label("wikitext2") == "WikiText-2 (raw, test)"
    assert label("c4") == "C4 (validation shard 0, 256 random windows)"
    assert label("ptb") == "PTB (test)"
    assert label("hf:ds:cfg:test:text") == "hf:ds:cfg:test:text"


# --- files -----------------------------------------------------------------------------------

def _write_all_formats(tmp_path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "eval.txt"
    txt.write_text("\n\n".join(texts), encoding="utf-8")
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" + ("\n" if i == 1 else "")
                             for i, t in enumerate(texts)), encoding="utf-8")
    parquet = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), parquet)
    return txt, jsonl, parquet


def test_txt_jsonl_and_parquet_give_one_stream(tmp_path, tok, hf):
    texts = ["First paragraph,\nwith a line break.", "Second one: ünïcode ✓", "Third."]
    streams = []
    for path in _write_all_formats(tmp_path, texts):
        assert read_text_file(path) == "\n\n".join(texts)
        (entry,) = parse_ppl_data(str(path))
        streams.append(load_ids(entry, tok, seq_len=8))
    expected = data.tokenize(tok, "\n\n".join(texts))
    for ids in streams:
        assert ids.dtype == torch.long and ids.dim() == 1 and ids.equal(expected)


def test_files_are_tokenized_without_special_tokens(tmp_path, bos_tok, hf):
    path = tmp_path / "eval.txt"
    path.write_text("Some words here.")
    (entry,) = parse_ppl_data(str(path))
    ids = load_ids(entry, bos_tok, seq_len=4)
    assert ids.tolist() == bos_tok("Some words here.", add_special_tokens=False)["input_ids"]
    assert ids[0] != bos_tok.bos_token_id


def test_changed_or_missing_file_fails_at_load(tmp_path, tok, hf):
    path = tmp_path / "eval.txt"
    path.write_text("original")
    (entry,) = parse_ppl_data(str(path))
    path.write_text("edited")
    assert "changed since it was chosen" in _one_line_error(load_ids, entry, tok, 8)
    assert "changed since it was chosen" in _one_line_error(check_available, [entry])
    path.unlink()
    assert "does not exist on this machine" in _one_line_error(load_ids, entry, tok, 8)


def test_malformed_files_are_one_line_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    assert "line 2 is not JSON" in _one_line_error(read_text_file, bad)
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert "line 2 has no string 'text' field" in _one_line_error(read_text_file, bad)
    table = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), table)
    assert "no 'text' column (columns: body)" in _one_line_error(read_text_file, table)
    pq.write_table(pa.table({"text": ["x", None]}), table)
    assert "row 1" in _one_line_error(read_text_file, table)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    assert "not a readable parquet file" in _one_line_error(read_text_file, tmp_path / "junk.parquet")


def test_text_flag_and_ppl_data_file_give_one_ppl(tmp_path, tiny, hf):
    from harness.eval.ppl import perplexity
    from harness.eval.saved import _evaluate

    model, tok = tiny
    texts = [data.split_text("calibration")[i * 120:(i + 1) * 120] for i in range(3)]
    _, jsonl, _ = _write_all_formats(tmp_path, texts)
    (entry,) = parse_ppl_data(str(jsonl))
    via_flag = _evaluate(model, tok, {}, str(jsonl), 16, None, None, None)
    via_data = perplexity(model, load_ids(entry, tok, 16), seq_len=16)
    assert via_flag["tokens"] == via_data.tokens > 16
    assert via_flag["ppl"] == via_data.ppl


# --- the standard sets from the Hugging Face cache -------------------------------------------

def test_wikitext2_is_the_reference_stream(hf, bos_tok):
    build_hf_cache(hf[0], "wikitext", "wikitext-2-raw-v1", "test", {"text": TEXTS})
    ids = load_ids("wikitext2", bos_tok, seq_len=8)
    # get_wikitext2: tokenizer("\n\n".join(testdata['text'])) with its default special tokens.
    assert ids.tolist() == bos_tok("\n\n".join(TEXTS))["input_ids"]
    assert ids[0] == bos_tok.bos_token_id
    assert load_ids("wikitext2", bos_tok, seq_len=32) is ids  # memoised, seq_len-free
    check_available(["wikitext2"])


def test_streams_are_memoised_per_tokenizer_definition(hf, tok, bos_tok):
    build_hf_cache(hf[0], "wikitext", "wikitext-2-raw-v1", "test", {"text": TEXTS})
    plain = load_ids("wikitext2", tok, seq_len=8)
    again = load_ids("wikitext2", copy.deepcopy(tok), seq_len=8)
    assert again is plain
    assert load_ids("wikitext2", bos_tok, seq_len=8).numel() == plain.numel() + 1


def test_ptb_joins_sentences_with_spaces(hf, tok):
    sentences = ["aer banknote berlitz calloway", "pierre <unk> N years old", "mr. <unk> is chairman"]
    build_hf_cache(hf[0], "ptb_text_only", "penn_treebank", "test", {"sentence": sentences})
    assert load_ids("ptb", tok, seq_len=8).tolist() == tok(" ".join(sentences))["input_ids"]


def test_hf_entry_reads_the_named_config_split_and_field(hf, tok):
    body = ["Alpha text.", "Beta text.", "Gamma text."]
    build_hf_cache(hf[0], "someorg/tiny_corpus", "cfg", "validation",
                   {"body": body, "n": [1, 2, 3]})
    (entry,) = parse_ppl_data("hf:someorg/tiny_corpus:cfg:validation:body")
    assert load_ids(entry, tok, seq_len=4).tolist() == tok("\n\n".join(body))["input_ids"]
    assert metric_name(entry) == "ppl_tiny_corpus_cfg"
    check_available([entry])

    def error(spec):
        return _one_line_error(load_ids, parse_ppl_data(spec)[0], tok, 4)

    assert "no field 'text' (fields: body, n)" in error("hf:someorg/tiny_corpus:cfg:validation")
    assert "not text" in error("hf:someorg/tiny_corpus:cfg:validation:n")
    assert "Unknown split" in error("hf:someorg/tiny_corpus:cfg:train:body")
    # Another configuration of a cached dataset is missing data, with its fill command.
    message = error("hf:someorg/tiny_corpus:other:validation:body")
    assert "not in the local Hugging Face cache" in message
    assert "datasets.load_dataset('someorg/tiny_corpus', 'other', split='validation')" in message


@pytest.mark.parametrize("same_commit", [True, False])
def test_hf_entry_without_config_must_name_one_when_several_are_cached(hf, tok, same_commit):
    # datasets refuses configs of one commit itself, and silently takes the latest otherwise.
    commits = ("a" * 40, "a" * 40) if same_commit else ("a" * 40, "b" * 40)
    build_hf_cache(hf[0], "multi", "one", "test", {"text": ["a"]}, commit=commits[0])
    build_hf_cache(hf[0], "multi", "two", "test", {"text": ["b"]}, commit=commits[1])
    message = _one_line_error(load_ids, parse_ppl_data("hf:multi")[0], tok, 4)
    assert "several configurations of multi (one, two); name one, e.g. hf:multi:one" in message
    assert load_ids(parse_ppl_data("hf:multi:two")[0], tok, 4).tolist() == tok("b")["input_ids"]


@pytest.mark.parametrize("other_config", [False, True])
def test_missing_dataset_names_the_fill_command(hf, tok, other_config):
    if other_config:  # datasets raises a ValueError, not a "missing" error, for this one
        build_hf_cache(hf[0], "wikitext", "wikitext-103-raw-v1", "test", {"text": TEXTS})
    for call, args in ((load_ids, ("wikitext2", tok, 8)), (check_available, (["wikitext2"],))):
        message = _one_line_error(call, *args)
        assert message.startswith("ppl data wikitext2 (WikiText-2 (raw, test)) is not in the "
                                  "local Hugging Face cache")
        assert WIKITEXT_FILL in message


def test_missing_c4_names_the_fill_command(hf, tok):
    message = _one_line_error(check_available, "c4")
    assert "ppl data c4 (C4 (validation shard 0, 256 random windows))" in message
    assert C4_FILL in message


def test_missing_datasets_package_is_one_line(hf, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert "pip install datasets" in _one_line_error(load_ids, "wikitext2", tok, 8)


def test_core_imports_without_datasets():
    code = ("import sys; import harness.eval.ppl_data as p; p.parse_ppl_data('c4,hf:x'); "
            "assert 'datasets' not in sys.modules and 'pyarrow' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- c4 --------------------------------------------------------------------------------------

SEQ = 16
C4_FILE = "en/c4-validation.00000-of-00008.json.gz"


def _c4_docs(tok, n_docs=40, seed=7):
    """Documents of 3 to 60 words, none of exactly SEQ tokens (the reference would crash)."""
    rng = random.Random(seed)
    words = "the of and to in harbor quantize winter seven lantern orbit".split()
    docs = []
    while len(docs) < n_docs:
        doc = " ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) + "."
        if len(tok(doc)["input_ids"]) != SEQ:
            docs.append(doc)
    return docs


def _store_c4(hub, docs):
    lines = "".join(json.dumps({"text": d, "timestamp": "2019-04-25", "url": "u"}) + "\n" for d in docs)
    return build_hub_file(hub, "allenai/c4", C4_FILE, gzip.compress(lines.encode()))


def _reference_get_c4_validation(tokenizer, shard, seqlen):
    """IST-DASLab/gptq datautils.get_c4's validation stream, as written there (global random,
    return_tensors='pt', torch.hstack), on the shard loaded through datasets' json builder."""
    import datasets

    valdata = datasets.load_dataset("json", data_files={"validation": str(shard)},
                                    split="validation")
    state = random.getstate()
    try:
        random.seed(0)
        valenc = []
        for _ in range(256):
            while True:
                i = random.randint(0, len(valdata) - 1)
                tmp = tokenizer(valdata[i]["text"], return_tensors="pt")
                if tmp.input_ids.shape[1] >= seqlen:
                    break
            i = random.randint(0, tmp.input_ids.shape[1] - seqlen - 1)
            j = i + seqlen
            valenc.append(tmp.input_ids[:, i:j])
        return torch.hstack(valenc)
    finally:
        random.setstate(state)


def test_c4_is_the_reference_windows(hf, bos_tok):
    docs = _c4_docs(bos_tok)
    lengths = [len(bos_tok(d)["input_ids"]) for d in docs]
    assert min(lengths) < SEQ < max(lengths)  # the redraw loop is exercised
    shard = _store_c4(hf[1], docs)
    ids = load_ids("c4", bos_tok, seq_len=SEQ)
    assert ids.shape == (256 * SEQ,) and ids.dtype == torch.long
    assert ids.tolist() == _reference_get_c4_validation(bos_tok, shard, SEQ)[0].tolist()
    # Deterministic across processes' memos, and a window length changes the windows.
    ppl_data._IDS.clear()
    assert load_ids("c4", bos_tok, seq_len=SEQ).equal(ids)
    longer = load_ids("c4", bos_tok, seq_len=SEQ + 4)
    assert longer.shape == (256 * (SEQ + 4),)
    assert load_ids("c4", bos_tok, seq_len=SEQ) is not longer
    check_available(["c4"])


def test_c4_found_in_an_older_snapshot(hf, tok):
    shard = _store_c4(hf[1], _c4_docs(tok))
    # A later download of the dataset card moved refs/main to a commit without the shard.
    refs = shard.parents[3] / "refs" / "main"
    refs.write_text("f" * 40)
    assert load_ids("c4", tok, seq_len=SEQ).shape == (256 * SEQ,)


def test_c4_skips_documents_of_exactly_seq_len(hf, tok):
    docs = _c4_docs(tok, n_docs=60)
    short = [d for d in docs if len(tok(d)["input_ids"]) < SEQ]
    exact = "the " * 200
    while len(tok(exact)["input_ids"]) > SEQ:
        exact = exact[:-4]
    assert len(tok(exact)["input_ids"]) == SEQ
    long_doc = next(d for d in docs if len(tok(d)["input_ids"]) > SEQ + 2)
    _store_c4(hf[1], [exact] * 5 + short[:5] + [long_doc])
    ids = load_ids("c4", tok, seq_len=SEQ).view(256, SEQ)
    # Every window comes from the one long document, never from its last offset (as GPTQ).
    source = tok(long_doc)["input_ids"]
    for window in ids.tolist():
        assert any(source[s:s + SEQ] == window for s in range(len(source) - SEQ)), window


def test_c4_without_a_long_enough_document_is_an_error(hf, tok):
    _store_c4(hf[1], ["short one.", "another short one."])
    assert "lower --seq-len" in _one_line_error(load_ids, "c4", tok, SEQ)


def test_shakespeare_is_the_unchanged_eval_split(tok):
    assert load_ids(SHAKESPEARE, tok, seq_len=16) is data.split_ids(tok, "eval")
    check_available("shakespeare")
