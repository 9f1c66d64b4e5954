"""The torch-free GGUF tokenizer (models.gguf_io.load_gguf_tokenizer) against transformers' own GGUF tokenizer.

The reference is `AutoTokenizer.from_pretrained(dir, gguf_file=name)`, whose GGUF reader imports torch (test extra
only). Compared: token ids of a few hundred strings (unicode, whitespace runs, digits, special tokens,
chat-templated conversations), decoded text, special tokens, and `apply_chat_template` strings and ids.
SmolLM2 ships with the runtime install; Qwen2.5-Coder-0.5B is compared when `make qwen` has assembled it.
"""
import itertools
import os

import pytest

from models.gguf_io import config_from_gguf, load_gguf_tokenizer
from tests.test_gguf_io import _real_gguf

_BASE = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "Hello", " Hello", "Hello world", "hello   world  ",
    "How do I bake bread? Answer in 3 steps.", "The war lasted from the year 1732 to the year 17",
    "When Mary and John went to the store, John gave a drink to", "0", "7", "42", "1234567890", "3.14159",
    "-12,345.67e-8", "2026-12-01T20:41:53Z", "x=1;y=2*x**3", "def f(a, b):\n    return a + b\n",
    "if (x) {\n\treturn 0;\n}", "ünïcödé", "naïve café résumé", "日本語のテキスト", "中文测试句子。", "Привет, мир!",
    "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ", "한국어 문장", "emoji 🤖🚀👍🏽 and 👨‍👩‍👧", "\u200b zero\u200dwidth",
    "Ａｂｃ full-width", "ﬁ ligature", "e\u0301 combining", "tab\tseparated\tvalues", "CRLF\r\nline",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>\n",
    "text<|im_end|>more", "<|im_start|> spaced <|im_end|>", "<s></s><unk>", "I'm can't won't you'll they'd",
    "URL: https://example.org/a?b=c&d=e#f", "e-mail a.b@c.de", "$100 & 50% off!!!", "((()))[[{}]]",
    "ALL CAPS SENTENCE", "MiXeD CaSe", "a" * 300, "ab " * 80, " " * 17 + "x", "1 " * 60,
]
_PIECES = ["Hello", " ", "  ", "\n", "123", "4.5", "日本", "é", "🤖", "<|im_end|>", "don't", "\t", "Zürich", "x" * 7]


def _strings():
  """About 400 strings: the base cases and every ordered pair and triple prefix of the pieces."""
  out = list(_BASE)
  out += ["".join(p) for p in itertools.permutations(_PIECES, 2)]
  out += ["".join(p) for p in itertools.islice(itertools.permutations(_PIECES, 3), 150)]
  return out


_CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 17 times 23?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about the sea.\n\nNo rhymes."}],
    [{"role": "user", "content": "  spaces  and\ttabs\n"}, {"role": "assistant", "content": "ok 🤖"}],
    [{"role": "system", "content": "日本語で答えて"}, {"role": "user", "content": "¿Qué tal?"}],
]


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def pair(request):
  from transformers import AutoTokenizer  # the reference path imports torch (test extra)
  path = _real_gguf(request.param)
  ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                      local_files_only=True)
  return load_gguf_tokenizer(path), ref, path


@pytest.mark.slow
def test_token_ids_match_transformers_on_hundreds_of_strings(pair):
  ours, ref, path = pair
  strings = _strings()
  assert len(strings) >= 300
  mismatches = [s for s in strings if ours(s).input_ids != ref(s).input_ids]
  assert mismatches == []
  batch = ours(strings[:64]).input_ids
  assert batch == ref(strings[:64]).input_ids
  ids = list(range(0, len(ref), 997)) + [ref.eos_token_id, ref.pad_token_id]
  assert ours.decode(ids) == ref.decode(ids)
  assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_special_tokens_and_vocabulary_match(pair):
  ours, ref, path = pair
  assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
  for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "eos_token_id", "pad_token_id",
               "all_special_tokens", "add_bos_token", "add_eos_token", "padding_side"):
    assert getattr(ours, attr, None) == getattr(ref, attr, None), attr
  assert ours.eos_token_id in config_from_gguf(path).eos_token_ids


@pytest.mark.slow
def test_chat_template_strings_and_ids_match(pair):
  ours, ref, path = pair
  assert ours("Hello").input_ids == ([19556] if "SmolLM2" in path else [9707])
  assert ours.chat_template and ours.chat_template == ref.chat_template
  for conv, gen in itertools.product(_CONVERSATIONS, (True, False)):
    text = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert ours(text).input_ids == ref(text).input_ids
  chat = ours.apply_chat_template(_CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
  assert "<|im_start|>user\nHello<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
