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
    key = td.cache_key("tiny-llama", prompts, 4, 0.7, 12)
    path = td._cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"sequences": torch.zeros(2, 36, dtype=torch.long)}, str(path),
              metadata={"model": "someone-else"})
    with pytest.raises(HarnessError, match="someone-else"):
        td.teacher_sequences("tiny-llama", lambda: model, tok, 2, 4, 0.7, 12, progress=False)


def test_gen_data_cli(cli):
    code, out, err = cli("gen-data", "--model", "tiny-llama", "--samples", "2",
                         "--new-tokens", "4", "--seed", "13")
    assert code == 0, err
    assert "2 sequences x 36 tokens" in out
