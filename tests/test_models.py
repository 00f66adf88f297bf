"""Resolving and loading target models: the error paths, the cache, and the real demo model."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from aerie import models
from aerie.errors import InputError, ModelError
from aerie.models import cache_dir, load_causal_lm, parse_dtype, resolve_model


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AERIE_CACHE", str(cache))
    return cache


def _fake_model_files(model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (model_dir / name).write_text("{}")


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AERIE_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("AERIE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "aerie"


def test_missing_path_is_refused_with_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="does not exist") as err:
        resolve_model(str(missing))
    assert str(missing) in str(err.value)
    assert "\n" not in str(err.value)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_directory_with_config_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_gguf_without_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF not really")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ModelError, match="pip install gguf"):
        resolve_model(str(gguf_file))


def test_converted_gguf_is_reused_without_converting(tmp_path, monkeypatch, _private_cache):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"some weights")
    digest = hashlib.sha256(b"some weights").hexdigest()
    converted = _private_cache / "models" / f"gguf-{digest[:16]}"
    _fake_model_files(converted)
    monkeypatch.setitem(sys.modules, "gguf", None)  # a conversion would fail
    assert resolve_model(str(gguf_file)) == converted


def test_interrupted_build_leaves_nothing_behind(_private_cache):
    def broken(dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models._cached("m", broken)
    assert [p.name for p in (_private_cache / "models").iterdir()] == [".m.lock"]

    built = models._cached("m", _fake_model_files)
    assert built == _private_cache / "models" / "m" and models._complete(built)
    assert models._cached("m", broken) == built  # complete: not rebuilt


def test_parse_dtype():
    assert parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(InputError, match="float32"):
        parse_dtype("int8")


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="llama, mistral, qwen2"):
        load_causal_lm(tmp_path, "cpu", torch.float32)


def test_demo_model_loads_and_answers(demo_model_dir):
    model, tokenizer = load_causal_lm(demo_model_dir, "cpu", torch.float32)
    assert model.config.model_type == "llama" and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    # The GGUF conversion must keep the chat template and the right special tokens.
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.generation_config.eos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_a_wheel_install_carries_the_shipped_heads(tmp_path):
    """`pip install .` (not editable) has no checkout beside the package: the heads travel in
    the wheel's data and `aerie.stack` finds them under the environment's prefix."""
    import subprocess
    import sysconfig
    import venv

    pytest.importorskip("setuptools")  # the wheel is built without fetching a build backend
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(root)], check=True, capture_output=True, timeout=600)
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    # torch and the rest come from this environment, after the new one's own packages.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "parent.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next((tmp_path / "dist").glob("aerie-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=600)
    out = subprocess.run([str(python), "-c", "import aerie.stack as s; print(s.__file__); print(s.DEMO_HEAD)"],
                         check=True, capture_output=True, text=True, cwd=tmp_path, timeout=120).stdout.split()
    module, head = Path(out[0]), Path(out[1])
    assert str(module).startswith(str(env)), "the wheel's package, not the checkout, was imported"
    assert head == env / "share" / "aerie" / "heads" / "smollm2-135m-eagle3"
    assert (head / "config.json").is_file() and (head / "model.safetensors").is_file()
