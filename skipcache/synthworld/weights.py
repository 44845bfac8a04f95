"""The shipped synth weights file: `synth.safetensors`.

This module owns the file format: the EMA state dict of `synth-vit` in fp16, with the
token-embedding rows that no caption or default prompt can produce dropped (the vocabulary has
49,408 rows; the synthetic world uses ~80). The kept row ids are stored as the tensor
`__kept_token_ids__`; the metadata holds the format tag and the full vocabulary size.
`load_synth_state_dict` restores the dropped rows as zeros, so a strict `load_state_dict` works.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from skipcache.errors import ModelError
from skipcache.synthworld.captions import caption_vocabulary

MODEL_NAME = "synth-vit"
FILE_FORMAT = "skipcache-synth-weights/1"
KEPT_IDS_KEY = "__kept_token_ids__"
TOKEN_EMBEDDING_KEY = "token_embedding.weight"


def kept_token_ids(tokenizer, extra_ids: set[int] = frozenset()) -> torch.Tensor:
    """Sorted token ids any caption or default prompt can produce, plus padding, SOT and EOT."""
    ids = {0, *extra_ids}
    for word in caption_vocabulary():
        ids.update(tokenizer([word])[0].tolist())
    return torch.tensor(sorted(ids), dtype=torch.int64)


def export_synth_weights(model: torch.nn.Module, path: Path, kept_ids: torch.Tensor, metadata: dict | None = None) -> None:
    """Write the model's state dict in fp16 with only the `kept_ids` token-embedding rows.

    The file is written next to `path` and renamed, so a crash never leaves a half-written file.
    """
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    embedding = state[TOKEN_EMBEDDING_KEY]  # (V, W)
    state[TOKEN_EMBEDDING_KEY] = embedding[kept_ids].contiguous()  # (K, W)
    state[KEPT_IDS_KEY] = kept_ids.clone()
    meta = {"format": FILE_FORMAT, "model": MODEL_NAME, "vocab_size": str(embedding.shape[0])}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_synth_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read `synth.safetensors` back into a full `synth-vit` state dict (fp16 tensors).

    The dropped token-embedding rows come back as zeros, so
    `model.load_state_dict(load_synth_state_dict(path))` works with `strict=True`.

    Raises:
        ModelError: the file is missing or not a synth weights file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"synth weights not found at {path}; run `python -m skipcache.synthworld.pretrain --out DIR`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise ModelError(f"cannot read synth weights {path}: {exc}; re-export or re-download the file") from None
    if meta.get("format") != FILE_FORMAT or KEPT_IDS_KEY not in state or TOKEN_EMBEDDING_KEY not in state:
        raise ModelError(f"{path} is not a synth weights file: expected format {FILE_FORMAT!r} with "
                         f"{KEPT_IDS_KEY!r}, found format {meta.get('format')!r}")
    kept = state.pop(KEPT_IDS_KEY).long()  # (K,)
    rows = state[TOKEN_EMBEDDING_KEY]  # (K, W)
    vocab = int(meta["vocab_size"])
    if rows.shape[0] != kept.shape[0] or int(kept.max()) >= vocab:
        raise ModelError(f"{path}: {rows.shape[0]} token rows for {kept.shape[0]} kept ids (vocab {vocab}); file is corrupt")
    full = torch.zeros(vocab, rows.shape[1], dtype=rows.dtype)  # (V, W)
    full[kept] = rows
    state[TOKEN_EMBEDDING_KEY] = full
    return state
