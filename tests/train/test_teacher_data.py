import pytest
import torch

from harness.errors import HarnessError
from harness.train import teacher_data as td


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Teacher files go to a fresh folder: a warm shared cache must not decide the outcome."""
    monkeypatch.setattr(td, "cache_dir", lambda: tmp_path)


def test_generate_cache_and_reuse(tiny, monkeypatch):
    model, tok = tiny
    calls = []

    def teacher():
        calls.append(1)
        return model

    kw = dict(samples=3, new_tokens=5, temperature=0.7, seed=11, progress=False)
    first = td.teacher_sequences("tiny-llama", teacher, tok, **kw)
    assert first.shape == (3, td.PROMPT_TOKENS + 5)
    again = td.teacher_sequences("tiny-llama", teacher, tok, **kw)
    assert torch.equal(first, again) and len(calls) == 1  # second call read the cache
    # Prompts come from the training plays only, deterministically.
    assert torch.equal(td.make_prompts(tok, 3, 11), first[:, : td.PROMPT_TOKENS])


def test_cache_of_another_model_is_refused(tiny):
    from safetensors.torch import save_file

    model, tok = tiny
    prompts = td.make_prompts(tok, 2, 12)
    key = td.cache_key("tiny-llama", prompts, 4, 0.7, 12, 50, 1.0)
    path = td._cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"sequences": torch.zeros(2, 36, dtype=torch.long)}, str(path),
              metadata={"model": "someone-else"})
    with pytest.raises(HarnessError, match="someone-else"):
        td.teacher_sequences("tiny-llama", lambda: model, tok, 2, 4, 0.7, 12, progress=False)


def test_two_writers_of_one_entry_both_land(tiny, monkeypatch):
    """Two runs of a sweep sampling the same teacher data at once: the second writes the entry
    between the first's write and its rename. Both return their data and the entry is whole
    (with one temporary name for both, the first's rename took the second's file and the
    second's rename failed)."""
    model, tok = tiny
    kw = dict(samples=2, new_tokens=4, temperature=0.7, seed=13, progress=False)
    real_save, other = td.save_file, []

    def save_then_another_writer(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if not other:
            other.append(None)  # the other writer's own save goes straight through
            other[0] = td.teacher_sequences("tiny-llama", lambda: model, tok, **kw)

    monkeypatch.setattr(td, "save_file", save_then_another_writer)
    first = td.teacher_sequences("tiny-llama", lambda: model, tok, **kw)
    assert torch.equal(first, other[0])
    [entry] = td.cache_dir().glob("teacher/*")  # no temporary file left behind
    monkeypatch.setattr(td, "save_file", real_save)
    assert torch.equal(td.teacher_sequences("tiny-llama", None, tok, **kw), first)


def test_gen_data_cli(cli):
    code, out, err = cli("gen-data", "--model", "tiny-llama", "--samples", "2",
                         "--new-tokens", "4", "--seed", "13")
    assert code == 0, err
    assert "2 sequences x 36 tokens" in out


class _Spy:
    """The tiny model behind a ``generate`` that records its keyword arguments."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def parameters(self):
        return self.model.parameters()

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        return self.model.generate(**kwargs)


def test_generation_samples_like_the_reference_hf_path(tiny):
    """BitDistiller's data/generation/generate.py: GenerationConfig(temperature=0.7,
    do_sample=True, top_p=1.0), whose top_k default is 50."""
    model, tok = tiny
    spy = _Spy(model)
    td.teacher_sequences("tiny-llama", lambda: spy, tok, 2, 3, seed=5, progress=False)
    [call] = spy.calls
    assert call["top_k"] == 50 and call["top_p"] == 1.0 and call["temperature"] == 0.7
    assert call["do_sample"] is True and call["max_new_tokens"] == 3
    spy.calls.clear()
    td.teacher_sequences("tiny-llama", lambda: spy, tok, 2, 3, seed=5, progress=False,
                         top_k=0, top_p=0.9)
    assert spy.calls[0]["top_k"] == 0 and spy.calls[0]["top_p"] == 0.9


def test_cache_key_covers_the_sampling_settings(tiny):
    _, tok = tiny
    prompts = td.make_prompts(tok, 2, 12)
    keys = {td.cache_key("tiny-llama", prompts, 4, t, 12, k, p)
            for t, k, p in [(0.7, 50, 1.0), (0.7, 0, 1.0), (0.7, 40, 1.0), (0.7, 50, 0.9),
                            (1.0, 50, 1.0)]}
    assert len(keys) == 5
    # files sampled with one random stream through all batches (before batches had their own
    # seeds) were keyed without "seeding": no key now matches them
    import hashlib
    import json

    for fields in ({"model": "tiny-llama", "new_tokens": 4, "temperature": 0.7, "seed": 12},
                   {"model": "tiny-llama", "new_tokens": 4, "temperature": 0.7, "seed": 12,
                    "top_k": 50, "top_p": 1.0, "batch": 64}):
        h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
        h.update(prompts.numpy().tobytes())
        assert h.hexdigest()[:20] not in keys | {td.cache_key("tiny-llama", prompts, 4, 0.7, 12,
                                                              0, 1.0, batch_size=16)}


def test_any_subset_of_batches_samples_what_one_process_samples(tiny):
    """Training workers split the batches (batch b on worker b mod N): each batch has its own
    seed, so the parts put back in order are the one-process data, for any N."""
    model, tok = tiny
    prompts = td.make_prompts(tok, 5, 12)
    kw = dict(new_tokens=6, temperature=0.7, seed=12, top_k=50, top_p=1.0, batch_size=2,
              progress=False)
    whole = td.generate(model, tok, prompts, **kw)
    assert whole.shape == (5, td.PROMPT_TOKENS + 6) and td.batch_count(prompts, 2) == 3
    last_first = td.generate(model, tok, prompts, batches=[2, 0], **kw)  # worker 0 of 2
    middle = td.generate(model, tok, prompts, batches=[1], **kw)  # worker 1 of 2
    assert torch.equal(torch.cat([last_first[1:3], middle, last_first[:1]]), whole)
    other_seed = td.generate(model, tok, prompts, **{**kw, "seed": 13})
    assert not torch.equal(other_seed[:, td.PROMPT_TOKENS:], whole[:, td.PROMPT_TOKENS:])


def test_the_batch_size_changes_the_samples_so_it_is_in_the_key(tiny):
    model, tok = tiny
    prompts = td.make_prompts(tok, 4, 12)
    by2 = td.generate(model, tok, prompts, 6, 0.7, 12, 50, 1.0, batch_size=2, progress=False)
    by4 = td.generate(model, tok, prompts, 6, 0.7, 12, 50, 1.0, batch_size=4, progress=False)
    assert not torch.equal(by2, by4)  # one random stream per call, drawn batch by batch
    keys = {td.cache_key("tiny-llama", prompts, 6, 0.7, 12, 50, 1.0, batch_size=b)
            for b in (2, 4)}
    assert len(keys) == 2


def test_other_sampling_settings_generate_again(tiny):
    model, tok = tiny
    spy = _Spy(model)
    kw = dict(samples=2, new_tokens=3, seed=6, progress=False)
    default = td.teacher_sequences("tiny-llama", lambda: spy, tok, **kw)
    td.teacher_sequences("tiny-llama", lambda: spy, tok, **kw, top_k=50)  # the same settings
    assert len(spy.calls) == 1
    td.teacher_sequences("tiny-llama", lambda: spy, tok, **kw, top_k=0)
    assert len(spy.calls) == 2 and spy.calls[1]["top_k"] == 0
    files = sorted((td.cache_dir() / "teacher").glob("*.safetensors"))
    assert len(files) == 2
    from safetensors import safe_open

    with safe_open(str(td._cache_path(td.cache_key("tiny-llama", default[:, :td.PROMPT_TOKENS],
                                                   3, 0.7, 6, 50, 1.0))), "pt") as f:
        assert f.metadata()["top_k"] == "50" and f.metadata()["top_p"] == "1.0"
