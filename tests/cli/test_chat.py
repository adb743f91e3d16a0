"""The chat app driven through a pseudo-terminal (pexpect), and its one-shot modes."""
import json
import re
import subprocess

import pexpect
import pytest

from tests.conftest import CLI


def _turn(child, text):
    child.sendline(text)
    child.expect(r"strategy (\S+) \| prompt (\d+) tok \| TTFT")
    strategy, tokens = child.match.group(1), int(child.match.group(2))
    child.expect("> ")
    return strategy, tokens


def _ignore_sigint():
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_two_turns_reuse_the_cache_strategy_switch_and_reset(chat):
    child = chat()
    _, first = _turn(child, "hello there, how are you")
    _, second = _turn(child, "and then?")
    assert second < first  # only the new tokens of turn 2 were prefilled
    child.sendline("/strategy lazy-aggressive")
    child.expect("strategy lazy-aggressive")
    child.expect("> ")
    strategy, whole = _turn(child, "one more")
    assert strategy == "lazy" and whole > first + second  # the new strategy prefills it all
    child.sendline("/stats")
    child.expect(r"turns 3 \|")
    child.expect("> ")
    child.sendline("/reset")
    child.expect("conversation reset")
    child.expect("> ")
    _, again = _turn(child, "hello there, how are you")
    assert again == first
    child.sendline("/nope")
    child.expect("unknown command /nope")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("started_ignoring_sigint", [False, True])
def test_ctrl_c_stops_a_reply_and_keeps_the_session(chat, cli_env, started_ignoring_sigint):
    """Also when whatever started the chat ignored SIGINT (a pytest-xdist worker does; Python
    keeps an inherited SIG_IGN): the chat restores Ctrl-C itself."""
    env = dict(cli_env, EDGEPREFILL_DECODE_DELAY_S="0.2")
    child = chat("--max-tokens", "200", env=env,
                 preexec_fn=_ignore_sigint if started_ignoring_sigint else None)
    child.sendline("tell me a long story")
    child.expect("story\r\n")  # the echo
    child.expect(r"[\s\S]")  # the reply streams (this tiny model's may be all newlines)
    import time

    time.sleep(0.5)
    child.sendintr()
    child.expect(r"reply stopped")
    child.expect("> ")
    child.sendline("/stats")  # the session is alive and answers
    child.expect(r"turns 0 \|")
    child.expect("> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_save_then_load_restores_the_caches(chat, tmp_path):
    child = chat()
    _turn(child, "remember the number forty two")
    _, second = _turn(child, "what number?")
    path = tmp_path / "conv.safetensors"
    child.sendline(f"/save {path}")
    child.expect("saved 4 messages and caches")
    child.expect("> ")
    child.sendline("/reset")
    child.expect("> ")
    child.sendline(f"/load {path}")
    child.expect("loaded 4 messages")
    child.expect("caches restored")
    child.expect("> ")
    _, third = _turn(child, "and again?")
    assert third <= second + 2  # no re-prefill of the loaded conversation
    child.sendline(f"/load {tmp_path / 'missing.safetensors'}")
    child.expect("does not exist")
    child.expect("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert not list(tmp_path.glob(".*tmp*"))


def test_one_shot_prompt_and_piped_stdin(tiny_models, cli_env):
    model = str(tiny_models["llama"])
    r = subprocess.run([*CLI, "chat", "--model", model, "--prompt",
                        "hello", "--max-tokens", "4"], env=cli_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"strategy full \| prompt \d+ tok", r.stderr)
    r = subprocess.run([*CLI, "chat", "--model", model,
                        "--max-tokens", "4"], input="a piped\nmulti-line document\n",
                       env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr and "TTFT" in r.stderr
    r = subprocess.run([*CLI, "chat", "--model", model],
                       input="", env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "prompt is empty" in r.stderr


def test_scripted_turns_reuse_the_conversation_and_write_their_stats(tiny_models, cli_env,
                                                                     tmp_path):
    out = tmp_path / "turns.json"
    r = subprocess.run([*CLI, "chat", "--model", str(tiny_models["llama"]), "--max-tokens", "4",
                        "--prompt", "The river Danube flows through ten countries. Which river?",
                        "--prompt", "How many?", "--stats-json", str(out)], env=cli_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first, second = json.loads(out.read_text())["turns"]
    # the second turn prefills only its own tokens over the first turn's cache
    assert second["context_tokens"] > first["context_tokens"] > second["prompt_tokens"]
    assert r.stderr.count("TTFT") == 2


def test_runahead_chat_two_turns_match_full(chat):
    """Turn 1 is prefilled by two persistent runahead workers (the cache comes back here),
    turn 2 extends it locally; the replies equal those of the full strategy."""
    replies = {}
    for strategy in ("full", "runahead"):
        child = chat("--strategy", strategy, "--workers", "2")
        out = []
        for text in ("hello there, how are you", "and then?"):
            child.sendline(text)
            child.expect(r"strategy (\S+) \| prompt (\d+) tok \| TTFT")
            out.append((child.before.split(text, 1)[-1].strip(), child.match.group(1)))
            child.expect("> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        replies[strategy] = out
    assert [r for r, _ in replies["runahead"]] == [r for r, _ in replies["full"]]
    assert [s for _, s in replies["runahead"]] == ["runahead", "full"]
