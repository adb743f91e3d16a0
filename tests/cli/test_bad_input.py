"""Careless input across the commands: one line naming the fix, a non-zero exit, nothing lost."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pexpect
import pytest

from tests.cli.test_chat import _turn
from tests.conftest import CLI


def cli(args, env, stdin=None, timeout=120):
    return subprocess.run([*CLI, *args], env=env, input=stdin, capture_output=True,
                          timeout=timeout)


def one_error_line(r, needle):
    err = r.stderr.decode()
    assert r.returncode != 0, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    # progress notes ("converting ...") may come first; the error is one line, the last
    assert "Traceback" not in err and needle in lines[-1], err
    assert sum("error" in x for x in lines) == 1, err
    return lines[-1]


def _gone(pid):
    """True once `pid` has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


LAUNCH = """
import sys
import edgeprefill
from edgeprefill.distributed.launch import launch
launch(2, ["--model", sys.argv[1], "--jobs", sys.argv[2], "--out", sys.argv[3]], timeout=600)
"""


def _children(pid):
    try:
        return [int(x) for t in os.listdir(f"/proc/{pid}/task")
                for x in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except FileNotFoundError:
        return []


KILLED_WRITE = """
import os, signal, sys
from edgeprefill.fsio import atomic_folder
with atomic_folder(sys.argv[1]) as tmp:
    (tmp / "half-written").write_text("x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_prompts_and_data_that_are_not_utf8_get_one_line(tiny_models, cli_env, tmp_path):
    model = ["--model", str(tiny_models["llama"])]
    one_error_line(cli(["generate", *model, "--prompt", "-"], cli_env, stdin=b"caf\xe9 au lait"),
                   "the prompt on stdin is not valid UTF-8 (byte 0xe9 at offset 3)")
    r = subprocess.run([sys.executable, "-m", "edgeprefill.apps.cli", "generate", *model,
                        "--prompt", b"caf\xe9"], env=cli_env, capture_output=True, timeout=120)
    one_error_line(r, "--prompt is not valid UTF-8")
    one_error_line(cli(["chat", *model], cli_env, stdin=b"\xff\xfe hi\n"),
                   "not valid UTF-8")
    bad = tmp_path / "pairs.jsonl"
    bad.write_bytes(b'{"prompt": "a\xe9", "continuation": "b"}\n')
    one_error_line(cli(["eval", *model, "--strategy", "lazy", "--data", str(bad)], cli_env),
                   f"{bad} is not valid UTF-8")


def test_parallel_strategies_check_the_context_like_full(tiny_models, cli_env):
    long = " ".join(["word"] * 3000)  # beyond the tiny models' context
    for strategy in ("full", "runahead", "runahead-kvp"):
        one_error_line(cli(["generate", "--model", str(tiny_models["llama"]), "--prompt", long,
                            "--strategy", strategy, "--kvp", "unused"], cli_env),
                       "but the model's context is")


def test_too_many_workers_are_refused_before_any_start(tiny_models, cli_env):
    line = one_error_line(cli(["generate", "--model", str(tiny_models["llama"]), "--prompt", "hi",
                               "--strategy", "runahead", "--workers", "999"], cli_env),
                          "--workers 999: this machine holds 1 to")
    assert "local workers" in line


def test_unwritable_cache_names_the_variable(tiny_models, cli_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cli_env["EDGEPREFILL_CACHE"] = str(blocker / "cache")
    one_error_line(cli(["generate", "--model", "default", "--prompt", "hi"], cli_env),
                   "set EDGEPREFILL_CACHE to a writable folder")


def test_export_checks_the_destination_before_any_work(tiny_models, cli_env, tmp_path):
    model = ["export", "--model", str(tiny_models["llama"])]
    a_file = tmp_path / "x.mlpackage"
    a_file.write_text("not a package")
    one_error_line(cli([*model, "--out", str(a_file), "--force"], cli_env, timeout=60),
                   "is a file, not a package folder")
    assert a_file.read_text() == "not a package"
    one_error_line(cli([*model, "--out", str(tmp_path / "no" / "x.mlpackage")], cli_env,
                       timeout=60), "does not exist")


def test_failed_save_keeps_the_chat_going(chat, tmp_path):
    child = chat()
    _turn(child, "hello there")
    cases = [(tmp_path / "missing" / "c.safetensors", "does not exist"),
             (tmp_path, "it is a folder")]
    if sys.platform.startswith("linux"):  # a folder no one may write in, even root
        cases.append((Path("/proc/self/chat.safetensors"), "cannot save the chat"))
    for where, why in cases:
        child.sendline(f"/save {where}")
        child.expect(why)
        child.expect("the conversation is kept")
        child.expect("> ")
    good = tmp_path / "ok.safetensors"
    child.sendline(f"/save {good}")
    child.expect("saved 2 messages")
    child.expect("> ")
    _turn(child, "and then?")  # still the same conversation
    child.sendline("/quit")
    child.close()
    meta = json.loads(subprocess.run(
        [sys.executable, "-c", "import mlx.core as mx, sys; print(mx.load(sys.argv[1], "
         "return_metadata=True)[1]['edgeprefill'])", str(good)], capture_output=True,
        text=True).stdout)
    assert len(meta["messages"]) == 2


def _as_from_a_terminal():
    """In the child, before exec: Ctrl-C's signal at its default, as a shell in a terminal
    starts a command. A runner started in the background (`cmd &` in a script) ignores SIGINT,
    every process it starts inherits that, and a Ctrl-C test would then wait forever."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_workers_end_however_their_parent_ends(tiny_models, cli_env, tmp_path, sig):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"jobs": [{"strategy": "runahead", "ids": list(range(5, 25))}]}))
    env = dict(cli_env, EDGEPREFILL_TEST_HANG_RANK="0")  # rank 0 never answers
    parent = subprocess.Popen([sys.executable, "-c", LAUNCH, str(tiny_models["llama"]),
                               str(jobs), str(tmp_path / "out.json")], env=env,
                              stderr=subprocess.PIPE, preexec_fn=_as_from_a_terminal)
    deadline = time.monotonic() + 60
    while len(kids := _children(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(kids) == 2
    time.sleep(1)  # the workers are up (rank 0 hangs, rank 1 waits for it)
    parent.send_signal(sig)
    parent.wait(30)
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(p) for p in kids), "runahead workers outlived their parent"


def test_dead_worker_error_shows_its_last_output(tiny_models, tmp_path):
    from edgeprefill.distributed.launch import launch
    from edgeprefill.errors import EdgeprefillError

    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"jobs": [{"strategy": "runahead", "ids": list(range(5, 25))}]}))
    args = ["--model", "/no/such/model", "--jobs", str(jobs), "--out", str(tmp_path / "o.json")]
    with pytest.raises(EdgeprefillError, match="its last output: .*model path not found"):
        launch(2, args, timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_chat_restarts_runahead_workers_after_one_dies(chat):
    child = chat("--strategy", "runahead", "--workers", "2")
    _turn(child, "hello there")
    kids = _children(child.pid)
    assert len(kids) == 2
    os.kill(kids[0], signal.SIGKILL)
    child.sendline("/reset")
    child.expect("conversation reset")
    child.expect("> ")
    child.sendline("a new conversation")
    child.expect("a runahead worker had died: restarted the workers")
    child.expect(r"strategy runahead \| prompt \d+ tok \| TTFT")
    child.expect("> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_model_folders_cards_and_gguf_files_that_read_but_are_wrong(tiny_models, cli_env,
                                                                    tmp_path):
    import shutil

    import gguf

    folder = shutil.copytree(tiny_models["llama"], tmp_path / "m")
    gen = ["generate", "--prompt", "hi", "--max-tokens", "2"]
    (folder / "config.json").write_text("[]")
    one_error_line(cli([*gen, "--model", str(folder)], cli_env), "config.json holds a list")
    cfg = json.loads((tiny_models["llama"] / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    one_error_line(cli([*gen, "--model", str(folder)], cli_env), "field 'hidden_size' is None")

    from edgeprefill.kvp.pairs import bundled_dir

    pair = shutil.copytree(bundled_dir() / "SmolLM2-135M-Instruct-T-0.50", tmp_path / "pair")
    card = json.loads((pair / "card.json").read_text())
    del card["aux"]
    (pair / "card.json").write_text(json.dumps(card))
    one_error_line(cli([*gen, "--model", str(tiny_models["llama"]), "--strategy", "kvp",
                        "--kvp", str(pair)], cli_env), "field 'aux' is None")

    bare = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(bare), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    one_error_line(cli([*gen, "--model", str(bare)], cli_env),
                   "GGUF file lacks metadata 'llama.embedding_length'")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_during_runahead_generate_ends_the_workers(tiny_models, cli_env):
    proc = subprocess.Popen([sys.executable, "-m", "edgeprefill.apps.cli", "generate", "--model",
                             str(tiny_models["llama"]), "--strategy", "runahead", "--workers",
                             "2", "--prompt", "hello", "--max-tokens", "5"],
                            env=dict(cli_env, EDGEPREFILL_TEST_HANG_RANK="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_as_from_a_terminal)
    deadline = time.monotonic() + 60
    while len(kids := _children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(kids) == 2, proc.stderr.read() if proc.poll() is not None else "no workers"
    time.sleep(1)  # rank 1 hangs: without Ctrl-C this would wait for the launch timeout
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"interrupted" in err and b"Traceback" not in err, err
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(p) for p in kids), "runahead workers outlived Ctrl-C"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_killed_mid_prefill_gives_one_line_and_no_orphan(tiny_models, cli_env):
    proc = subprocess.Popen([*CLI, "generate", "--model", str(tiny_models["llama"]),
                             "--strategy", "runahead", "--workers", "2", "--prompt", "hello"],
                            env=dict(cli_env, EDGEPREFILL_TEST_HANG_RANK="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(kids := _children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(kids) == 2
    time.sleep(1)
    os.kill(kids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, b"", err)
    one_error_line(r, "a runahead worker failed (rank 1, exit code -9; its last output")
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(p) for p in kids)


@pytest.mark.parametrize("args, flag", [
    (["generate", "--prompt", "hi", "--seed", "-1"], "--seed"),
    (["generate", "--prompt", "hi", "--temp", "nan"], "--temp"),
    (["generate", "--prompt", "hi", "--top-p", "2"], "--top-p"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "--prompt", "hi", "--workers", "0"], "--workers"),
    (["generate", "--prompt", "hi", "--kvp-tail", "x"], "--kvp-tail"),
    (["bench", "--chunk-size", "-5"], "--chunk-size"),
    (["chat", "--prompt", "hi", "--temp", "inf"], "--temp"),
    (["kvp", "fit", "--lam", "0"], "--lam"),
    (["kvp", "train", "--lr", "-1"], "--lr"),
    (["runahead", "tune", "--timeout", "nan"], "--timeout"),
])
def test_numeric_flags_are_checked_when_parsed(args, flag, cli_env):
    r = cli(args, cli_env, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err
    assert f"argument {flag}" in err.strip().splitlines()[-1], err


def test_temporaries_of_killed_runs_are_cleaned_at_the_next_start(tiny_models, cli_env,
                                                                    tmp_path):
    from edgeprefill.fsio import clean_stale
    from tests.gguf_fixture import write_tiny_gguf

    gguf_file = write_tiny_gguf(tiny_models["llama"], tmp_path / "t.gguf")
    # a first conversion killed mid-write (SIGKILL: no clean-up of its own)
    dest = subprocess.run([sys.executable, "-c", "import sys; from edgeprefill.loading import "
                           "converted_gguf_path as p; print(p(sys.argv[1]))", str(gguf_file)],
                          env=cli_env, capture_output=True, text=True).stdout.strip()
    dest = Path(dest)
    dest.parent.mkdir(parents=True)
    r = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(dest)], env=cli_env)
    assert r.returncode == -signal.SIGKILL
    stale = [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")
             and not p.name.endswith(".lock")]
    assert len(stale) == 1 and stale[0].is_dir()
    r = cli(["generate", "--model", str(gguf_file), "--prompt", "hi", "--max-tokens", "2"],
            cli_env)
    assert r.returncode == 0, r.stderr
    assert not stale[0].exists() and (dest / "config.json").is_file()
    # the chat's runahead job folders in /dev/shm are cleaned the same way
    shm = tmp_path / "shm"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (shm / f"edgeprefill-runahead-{dead}.abc").mkdir(parents=True)
    (shm / f"edgeprefill-runahead-{os.getpid()}.mine").mkdir()
    clean_stale(shm, "edgeprefill-runahead-")
    assert [p.name for p in shm.iterdir()] == [f"edgeprefill-runahead-{os.getpid()}.mine"]


def test_two_first_runs_of_the_default_model_at_once_both_succeed(cli_env):
    args = ["generate", "--model", "default", "--strategy", "kvp", "--prompt",
            "What is the capital of France?", "--max-tokens", "8", "--json"]
    procs = [subprocess.Popen([*CLI, *args], env=cli_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()[-2000:]
        assert "Paris" in json.loads(out)["text"]
    cache = Path(cli_env["EDGEPREFILL_CACHE"])
    assert len(list((cache / "models").glob("SmolLM2-*"))) == 1
    leftovers = [p for d in (cache / "models", cache / "kvp") for p in d.iterdir()
                 if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert not leftovers, leftovers


def test_workers_run_the_installed_package_not_a_folder_of_the_users(tiny_models, cli_env,
                                                                     tmp_path):
    for fake in ("apps/cli.py", "edgeprefill/apps/cli.py", "edgeprefill/__init__.py"):
        (tmp_path / fake).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / fake).write_text("raise SystemExit('HIJACKED')\n")
    (tmp_path / "apps/__init__.py").write_text("")
    (tmp_path / "edgeprefill/apps/__init__.py").write_text("")
    entry = Path(sys.executable).with_name("edgeprefill")
    env = {k: v for k, v in cli_env.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(entry), "generate", "--model", str(tiny_models["llama"]),
                        "--strategy", "runahead", "--workers", "2", "--prompt", "hello",
                        "--max-tokens", "3", "--json"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "HIJACKED" not in r.stdout + r.stderr, r.stderr
    assert json.loads(r.stdout)["stats"]["extra"]["workers"] == 2
