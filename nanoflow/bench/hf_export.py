"""A GGUF model as an HF directory (config.json + safetensors + tokenizer), for peers that only load HF dirs (vLLM).

The conversion runs once per GGUF file: the result lives in the cache dir (``$NANOFLOW_CACHE_DIR`` or
``$XDG_CACHE_HOME/nanoflow``, as for profiles and plans), keyed by the file's content hash, and is reused
afterwards. Weights are dequantized by transformers and saved in float32, so a peer loading the directory in
float32 sees exactly the numbers our GGUF loader does, and one loading it in bfloat16 rounds them as we do.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

_CHUNK = 1 << 20


def cache_root() -> str:
    """Where converted models live: $NANOFLOW_CACHE_DIR/hf_export, else ~/.cache/nanoflow/hf_export."""
    from nanoflow.env import cache_dir
    return cache_dir("hf_export")


def _file_digest(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()[:16]


def export_gguf_to_hf(gguf_path: str, out_dir: str | None = None) -> str:
    """The HF directory holding ``gguf_path`` as float32 safetensors + config.json + tokenizer files;
    converted on the first call, reused afterwards. ``out_dir`` overrides the cache location."""
    gguf_path = os.path.abspath(gguf_path)
    if out_dir is None:
        stem = os.path.splitext(os.path.basename(gguf_path))[0]
        out_dir = os.path.join(cache_root(), f"{stem}-{_file_digest(gguf_path)}")
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)  # rename at the end: a crash leaves no half model
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache's other entries are not
    try:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        # The weights are already dequantized; transformers still tags the model as "gguf-quantized" and
        # refuses to save it. Drop the tag so it saves as the plain float32 checkpoint it is.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(tmp)
        del model
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first: keep theirs
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def hf_model_dir(model: str) -> str:
    """An HF directory for ``model`` (anything `resolve_model` accepts but dummy:): itself if it is one,
    else the cached conversion of the GGUF."""
    from nanoflow.models.loader import resolve_model
    src = resolve_model(model)
    if src.kind == "hf":
        return src.path
    if src.kind == "gguf":
        return export_gguf_to_hf(src.path)
    raise ValueError(f"model {model!r} has no weights to export (kind {src.kind})")
