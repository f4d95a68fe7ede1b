"""A hostile or careless user, case by case: a folder of their own as --out, two runs in one folder, a backbone
swapped under a resume, nonsense batch sizes and seeds, Python API misuse, and data files built to break a reader
(deep nesting, huge integers, link loops, oversized CSV fields, a .gz that inflates to one huge line), a full disk.
Each case: a clear error (exit 1 from the CLI, a UserError from the library), and nothing of the user's changed.
"""

from __future__ import annotations

import csv
import fcntl
import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from moerm.cli import app
from moerm.config import ConfigError, load_config
from moerm.data.readers import DataError, load_pairs, write_jsonl
from moerm.data.schema import InvalidRecord
from moerm.encoding import load_tokenizer
from moerm.errors import UserError
from moerm.systems import build_system, load_system

from conftest import toy_pairs

runner = CliRunner()
FAST = ["--no-progress", "--set", "model.max_length=32", "--set", "train.batch_size=8", "--set", "train.epochs=1",
        "--set", "model.tuning=frozen"]


def _data(tmp_path: Path, n: int = 16) -> Path:
    d = tmp_path / "data"
    write_jsonl(toy_pairs(n, seed=1, domain="alpha"), d / "alpha" / "train.jsonl")
    return d


def _train(tiny_bert: str, data: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", "--backbone", tiny_bert, "--data", str(data), "--out", str(out), *FAST,
                               *extra])


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and its modification time (a rewrite with the same bytes shows too)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _other_bert(path: Path) -> None:
    """Another model of the same shape, saved over `path` (weights replaced in place)."""
    torch.manual_seed(123)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path, safe_serialization=True)
    load_tokenizer("minilm").save_pretrained(path)


# ---------------------------------------------------------------- the user's folders


@pytest.mark.parametrize("theirs", ["data.json", "metrics.jsonl", "model/weights.bin", "notes.txt"])
def test_a_folder_of_the_users_own_files_is_refused_as_out_and_left_as_it_was(tmp_path, tiny_bert, theirs):
    out = tmp_path / "mine"
    (out / theirs).parent.mkdir(parents=True, exist_ok=True)
    (out / theirs).write_text("the user's own file\n")
    before = _snapshot(out)
    res = _train(tiny_bert, _data(tmp_path), out)
    assert res.exit_code == 1, res.output
    assert "holds no moerm run" in res.output and theirs.split("/")[0] in res.output
    assert _snapshot(out) == before


def test_seeds_into_a_folder_of_the_users_own_files_is_refused(tmp_path, tiny_bert):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    res = _train(tiny_bert, _data(tmp_path), out, "--seeds", "0,1")
    assert res.exit_code == 1 and "may only hold seed-*" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_run_folder_in_use_by_another_process_is_refused_and_not_written(tmp_path, tiny_bert):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".moerm.lock", os.O_RDWR | os.O_CREAT)  # another process's lock (flock: per open file)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        res = _train(tiny_bert, _data(tmp_path), out)
    finally:
        os.close(fd)
    assert res.exit_code == 1 and "in use by another moerm process" in res.output, res.output
    assert len(res.output.strip().splitlines()[-1]) < 300 and not (out / "config.yaml").exists()
    assert _train(tiny_bert, _data(tmp_path), out).exit_code == 0  # released: the same command now runs


def test_a_run_started_by_another_process_meanwhile_is_not_overwritten(tmp_path, tiny_bert, monkeypatch):
    import moerm.runs

    out = tmp_path / "run"
    real = moerm.runs.load_run_data

    def the_other_starts_first(*a, **k):  # both looked at an empty folder; the other one wrote first
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text("the other run's config\n")
        return real(*a, **k)

    monkeypatch.setattr(moerm.runs, "load_run_data", the_other_starts_first)
    res = _train(tiny_bert, _data(tmp_path), out)
    assert res.exit_code == 1 and "meanwhile" in res.output, res.output
    assert (out / "config.yaml").read_text() == "the other run's config\n"
    assert sorted(p.name for p in out.iterdir() if p.name != ".moerm.lock") == ["config.yaml"]


def test_add_domain_is_refused_while_the_run_is_in_use(tmp_path, tiny_bert):
    cfg = load_config(None, [f"model.backbone={tiny_bert}", "model.tuning=frozen", "model.max_length=32"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    build_system(cfg).save(run / "model")
    fd = os.open(run / ".moerm.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        res = runner.invoke(app, ["add-domain", str(run), "--data", str(_data(tmp_path)), "--no-progress"])
    finally:
        os.close(fd)
    assert res.exit_code == 1 and "in use by another moerm process" in res.output, res.output


def test_the_lock_of_a_killed_process_is_released(tmp_path):
    from moerm.run_folder import RunFolderError, RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from moerm.run_folder import RunLock; "
                               f"RunLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match="in use"):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with RunLock(tmp_path / "run"):  # kill -9 left no stale lock
        pass


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("swap", ["config.yaml edited", "weights replaced"])
def test_resume_of_a_finished_run_refuses_a_swapped_backbone(tmp_path, tiny_bert, swap):
    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    data, run = _data(tmp_path), tmp_path / "run"
    assert _train(str(base), data, run).exit_code == 0
    if swap == "weights replaced":
        _other_bert(base)
    else:
        other = tmp_path / "other"
        _other_bert(other)
        cfg = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(cfg.replace(str(base), str(other)))
    before = _snapshot(run / "model")
    res = _train(str(base), data, run, "--resume")
    assert res.exit_code == 1 and "cannot resume" in res.output and "backbone" in res.output, res.output
    assert _snapshot(run / "model") == before


def test_resume_of_a_killed_run_refuses_a_backbone_replaced_in_place(tmp_path, tiny_bert):
    from moerm.runs import train_run

    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    data, run = _data(tmp_path), tmp_path / "run"
    cfg = load_config(None, [f"model.backbone={base}", "model.max_length=32", "train.batch_size=4",
                             "train.save_every=1", f"data.train={json.dumps([str(data)])}"])
    with pytest.raises(RuntimeError, match="stop"):  # the test hook: killed after step 1's checkpoint
        train_run(cfg, run, progress=False, stop_after_steps=1)
    assert not (run / "model").exists()
    _other_bert(base)
    res = runner.invoke(app, ["train", "--backbone", str(base), "--data", str(data), "--out", str(run), "--resume",
                              "--no-progress"])
    assert res.exit_code == 1 and "cannot resume" in res.output, res.output
    assert not (run / "model").exists()


def test_a_no_op_resume_of_a_finished_run_never_rewrites_its_model(tmp_path, tiny_bert):
    data, run = _data(tmp_path), tmp_path / "run"
    assert _train(tiny_bert, data, run).exit_code == 0
    before = _snapshot(run)
    res = _train(tiny_bert, data, run, "--resume")
    assert res.exit_code == 0 and "complete" in res.output, res.output
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k != ".moerm.lock"} == \
        {k: v for k, v in before.items() if k != ".moerm.lock"}


# ---------------------------------------------------------------- options and the Python API


@pytest.mark.parametrize("command", ["score", "eval"])
@pytest.mark.parametrize("size", ["-1", "0"])
def test_a_batch_size_below_one_is_refused(tmp_path, tiny_bert, command, size):
    cfg = load_config(None, [f"model.backbone={tiny_bert}", "model.tuning=frozen", "model.max_length=32"])
    build_system(cfg).save(tmp_path / "model")
    out = tmp_path / "out.jsonl"
    if command == "score":
        args = ["score", str(tmp_path / "model"), "--prompt", "p", "--response", "r", "-o", str(out)]
    else:
        data = tmp_path / "test.jsonl"
        write_jsonl(toy_pairs(4, seed=2, domain="alpha"), data)
        args = ["eval", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "ev")]
    res = runner.invoke(app, [*args, "--batch-size", size])
    assert res.exit_code == 1 and "--batch-size must be >= 1" in res.output, res.output
    assert not out.exists() and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("args,needle", [(["--batch-size", "0"], "--batch-size must be >= 1"),
                                         (["--seed", "-1"], "outside 0..4294967295")])
def test_bon_refuses_a_batch_size_below_one_and_a_seed_numpy_cannot_take(tmp_path, args, needle):
    res = runner.invoke(app, ["bon", str(tmp_path / "run"), "--data", str(tmp_path / "bon.jsonl"), *args])
    assert res.exit_code == 1 and needle in res.output, res.output


@pytest.mark.parametrize("call,needle", [
    (lambda s: s.score("hello", "world"), "prompts must be a list of strings, got a single str"),
    (lambda s: s.score(["a", "b"], ["x"]), "2 prompts but 1 responses"),
    (lambda s: s.score(["a", "b"], ["x", "y"], ["d"]), "2 prompts but 1 domains"),
    (lambda s: s.score(["a"], ["x"], [3]), r"domains\[0\] must be a string or None, got int"),
    (lambda s: s.score(["a"], [b"x"]), r"responses\[0\] must be a string, got bytes"),
    (lambda s: s.score(["a"], ["x"], "d"), "domains must be a list"),
    (lambda s: s.score(["a"], ["x"], batch_size=0), "batch_size must be an integer >= 1"),
])
@pytest.mark.parametrize("system", ["baseline", "rodos"])
def test_score_arguments_are_checked_with_a_clear_error(tiny_bert, call, needle, system):
    built = build_system(load_config(None, [f"model.backbone={tiny_bert}", f"system={system}", "model.max_length=32"]))
    with pytest.raises(UserError, match=needle) as e:
        call(built)
    assert isinstance(e.value, TypeError)  # ScoreArgumentError: a UserError, and a TypeError for Python callers


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_system_on_cuda_without_cuda_says_so(tmp_path, tiny_bert):
    build_system(load_config(None, [f"model.backbone={tiny_bert}", "model.tuning=frozen", "model.max_length=32"])
                 ).save(tmp_path / "model")
    with pytest.raises(UserError, match="CUDA is not available") as e:
        load_system(tmp_path / "model", device="cuda")
    assert "cannot be read" not in str(e.value)


@pytest.mark.parametrize("args", [["--seeds", "-1"], ["--seeds", "0,4294967296"], ["--set", "train.seed=-5"],
                                  ["--set", "train.seed=" + "7" * 5000]])
def test_a_seed_outside_what_numpy_takes_is_refused_before_the_data_is_read(tmp_path, tiny_bert, monkeypatch, args):
    import moerm.runs

    def no_reading(*a, **k):
        raise AssertionError("the data was read before the seed was checked")

    monkeypatch.setattr(moerm.runs, "load_pairs", no_reading)
    res = _train(tiny_bert, _data(tmp_path), tmp_path / "run", *args)
    assert res.exit_code == 1 and "seed" in res.output, res.output
    assert len(res.output) < 500 and not (tmp_path / "run").exists()


def test_a_number_of_400_digits_in_a_config_is_a_config_error():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=" + "9" * 400])


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_an_empty_training_file_is_refused_before_anything_is_written(tmp_path, tiny_bert, content):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    out = tmp_path / "run"
    res = _train(tiny_bert, data, out)
    assert res.exit_code == 1 and "no training pairs" in res.output, res.output
    assert not out.exists()
    write_jsonl(toy_pairs(16, seed=1, domain="alpha"), data)  # corrected: the same command now runs
    assert _train(tiny_bert, data, out).exit_code == 0


# ---------------------------------------------------------------- data built to break a reader


def _rec(**kw) -> dict:
    return {"id": "1", "domain": "d", "prompt": "p", "chosen": "good", "rejected": "bad", **kw}


def _jsonl(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_json_nested_100k_deep_is_an_invalid_record_and_skip_skips_it(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = _jsonl(tmp_path / "d.jsonl", deep, json.dumps(_rec(id="2")))
    with pytest.raises(InvalidRecord, match="nested too deeply") as e:
        load_pairs([path])
    assert e.value.line == 1
    pairs, report = load_pairs([path], on_invalid="skip")
    assert [p.id for p in pairs] == ["2"] and report.n_invalid == 1
    obj = '{"a": ' * 100_000 + "1" + "}" * 100_000
    whole = tmp_path / "w.json"
    whole.write_text(obj)
    with pytest.raises(DataError, match="nested too deeply"):
        load_pairs([str(whole)])


@pytest.mark.parametrize("digits", [400, 5000])
@pytest.mark.parametrize("field", ["margin", "aspects_chosen"])
def test_integers_of_hundreds_or_thousands_of_digits_are_invalid_records(tmp_path, digits, field):
    big = "9" * digits
    rec = json.dumps(_rec()).rstrip("}") + (f', "margin": {big}}}' if field == "margin"
                                           else f', "aspects_chosen": {{"a": {big}}}}}')
    path = _jsonl(tmp_path / "d.jsonl", rec, json.dumps(_rec(id="2")))
    with pytest.raises(InvalidRecord) as e:
        load_pairs([path])
    assert e.value.line == 1 and len(str(e.value)) < 300
    pairs, report = load_pairs([path], on_invalid="skip")
    assert [p.id for p in pairs] == ["2"] and report.n_invalid == 1


def test_an_integer_of_5000_digits_in_a_json_file_or_score_input_is_a_data_error(tmp_path):
    from moerm.runs import read_score_requests

    whole = tmp_path / "d.json"
    whole.write_text(json.dumps([_rec()]).replace('"id": "1"', '"id": "1", "margin": ' + "9" * 5000))
    with pytest.raises(DataError, match="4300 digits"):
        load_pairs([str(whole)])
    requests = _jsonl(tmp_path / "in.jsonl", '{"prompt": "p", "response": "r", "n": ' + "1" * 5000 + "}",)
    with pytest.raises(DataError, match=r"in\.jsonl:1: invalid JSON"):
        read_score_requests(Path(requests))
    deep = _jsonl(tmp_path / "deep.jsonl", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep\.jsonl:1: invalid JSON \(nested too deeply\)"):
        read_score_requests(Path(deep))


def test_a_loop_of_symbolic_links_is_a_data_error(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(toy_pairs(2, seed=1, domain="alpha"), d / "train-a.jsonl")
    (d / "train-x.jsonl").symlink_to(d / "train-y.jsonl")
    (d / "train-y.jsonl").symlink_to(d / "train-x.jsonl")
    with pytest.raises(DataError, match="loop of symbolic links"):
        load_pairs([str(d)])
    with pytest.raises(DataError, match="loop of links"):
        load_pairs([str(d / "train-x.jsonl")])


def test_a_csv_field_past_the_csv_modules_limit_is_a_data_error_naming_the_line(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "domain", "prompt", "chosen", "rejected"])
        w.writerow(["1", "d", "p", "good", "bad"])
        w.writerow(["2", "d", "p", "x" * (csv.field_size_limit() + 10), "bad"])
    with pytest.raises(DataError, match=r"d\.csv:3: cannot read CSV \(field larger than field limit"):
        load_pairs([str(path)])


def test_a_gz_that_inflates_to_one_huge_line_is_read_in_bounded_memory_and_skipped(tmp_path, monkeypatch):
    from moerm.data import readers

    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 2**20, raising=False)  # 1 MiB here, to measure the bound
    huge = 40 * 2**20  # 40 MiB in one line, about 40 KB gzipped
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b'{"id": "1", "prompt": "' + b"a" * huge + b'"}\n')
        f.write(json.dumps(_rec(id="2")).encode() + b"\n")
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        pairs, report = load_pairs([str(path)], on_invalid="skip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [p.id for p in pairs] == ["2"] and report.n_invalid == 1
    assert "line longer than" in str(report.invalid[0]) and report.invalid[0].line == 1
    assert peak < 8 * 2**20, peak  # a few times the 1 MiB bound, never the 40 MiB line


def test_a_full_disk_while_saving_is_an_environment_error_not_ours(tmp_path, tiny_bert):
    """A real write failure (the file size limit, as a full disk would): safetensors raises SafetensorError, not
    OSError; the CLI must still say it is the machine's, with exit 1."""
    data = _data(tmp_path)
    limit = 200_000  # config.yaml and the logs fit; the backbone's weights (~4 MB) do not

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal, as ENOSPC on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MOERM_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-m", "moerm.cli", "train", "--backbone", tiny_bert, "--data", str(data),
                          "--out", str(tmp_path / "run"), "--no-progress", "--no-eval", "--set", "model.max_length=32",
                          "--set", "train.batch_size=8", "--set", "train.epochs=1", "--set", "model.tuning=full"],
                         env=env, capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "internal error" not in res.stderr and "File too large" in res.stderr, res.stderr[-2000:]


def test_a_second_lock_on_one_folder_is_refused_until_the_first_is_released(tmp_path):
    """Two locks on one folder in one process (two open files): the second is refused while the first is held,
    and taken once it is released - no sleeping, no timing."""
    from moerm.run_folder import RunFolderError, RunLock

    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunFolderError):
        RunLock(tmp_path / "run").acquire()
    first.release()
    RunLock(tmp_path / "run").acquire().release()
