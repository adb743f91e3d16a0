"""What a fresh install needs: no torch on the core path, the README's Python example, a wheel
that carries the apps and the trained pair under the edgeprefill namespace, the GGUF tokenizer."""
import json

import pytest

from edgeprefill.errors import EdgeprefillError
from tests.gguf_fixture import write_tiny_gguf


def test_smollm_pre_tokenizer_gives_every_digit_its_own_token(tiny_models, tmp_path):
    from edgeprefill.gguf import convert_gguf
    from edgeprefill.loading import load

    plain = convert_gguf(write_tiny_gguf(tiny_models["llama"], tmp_path / "a.gguf"),
                         tmp_path / "a")
    smollm = convert_gguf(write_tiny_gguf(tiny_models["llama"], tmp_path / "b.gguf",
                                          pre="smollm"), tmp_path / "b")
    text = "pi is 31415926 and  2024 came"
    a, b = load(str(plain)).tokenizer, load(str(smollm)).tokenizer
    assert a.decode(a.encode(text)) == text == b.decode(b.encode(text))
    digits = [t for t in b.encode(text) if b.decode([t]).strip().isdigit()]
    assert len(digits) == sum(ch.isdigit() for ch in text)
    tc = json.loads((smollm / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and "chat_template" in tc


@pytest.mark.parametrize("kw, message", [
    ({"pre": "deepseek-coder"}, "pre-tokenizer 'deepseek-coder' is not supported"),
    ({"tokenizer_model": "llama"}, "GGUF tokenizer 'llama' is not supported"),
])
def test_unsupported_gguf_tokenizers_are_refused_in_one_line(tiny_models, tmp_path, kw,
                                                             message):
    from edgeprefill.gguf import convert_gguf

    gguf_file = write_tiny_gguf(tiny_models["llama"], tmp_path / "x.gguf", **kw)
    with pytest.raises(EdgeprefillError, match=message):
        convert_gguf(gguf_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()
