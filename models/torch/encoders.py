"""Text encoders: the ``transformers`` classes each diffusers pipeline uses, tiny from code or a local checkpoint.

``TextEncoders`` holds one family's encoders under the pipeline's attribute names (``text_encoder``,
``text_encoder_2``, ``text_encoder_3``), so a checkpoint's sub-folders load into the same slots. The helpers
below are the pipelines' own read-outs: CLIP's penultimate hidden state and pooled output, T5's last hidden
state, Llama's hidden state three layers from the top (HunyuanVideo skips two).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ditplan.models.torch.spec import TEXT_LEN

VOCAB = 1000  # tiny vocabularies; CLIP's end-of-text id is the last one, as in the real tokenizer


def tiny_clip(hidden: int, projection: int | None = None) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=TEXT_LEN, projection_dim=projection or hidden,
                bos_token_id=0, eos_token_id=VOCAB - 1, pad_token_id=1, hidden_act="quick_gelu")


def tiny_t5(d_model: int) -> dict:
    return dict(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def tiny_llama(hidden: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * TEXT_LEN, bos_token_id=0,
                eos_token_id=2, pad_token_id=1)


_CONFIGS = {"CLIPTextModel": "CLIPTextConfig", "CLIPTextModelWithProjection": "CLIPTextConfig",
            "T5EncoderModel": "T5Config", "UMT5EncoderModel": "UMT5Config", "LlamaModel": "LlamaConfig"}


class TextEncoders(torch.nn.Module):
    """One family's text encoders by pipeline slot; the ``text`` component of a catalog model."""

    def __init__(self, encoders: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        self.encoders = torch.nn.ModuleDict(encoders)

    def __getitem__(self, slot: str) -> torch.nn.Module:
        return self.encoders[slot]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def tiny_text_encoders(classes: dict[str, str], configs: dict[str, dict], seed: int = 0) -> TextEncoders:
    import transformers
    out = {}
    with torch.random.fork_rng(devices=[]):
        for i, (slot, cls) in enumerate(classes.items()):
            torch.manual_seed(seed + i)
            config = getattr(transformers, _CONFIGS[cls])(**configs[slot])
            out[slot] = getattr(transformers, cls)(config)
    return TextEncoders(out).eval().requires_grad_(False)


def load_text_encoders(classes: dict[str, str], path: str | Path, dtype=torch.float32) -> TextEncoders:
    """The encoders of a local diffusers checkpoint (``path/text_encoder``, ...); never touches the hub."""
    import transformers
    return TextEncoders({slot: getattr(transformers, cls).from_pretrained(Path(path) / slot, torch_dtype=dtype,
                                                                          local_files_only=True)
                         for slot, cls in classes.items()}).eval().requires_grad_(False)


def clip_embeds(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden state, pooled output): what SD3 and SDXL take from each CLIP."""
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.hidden_states[-2], pooled


def clip_pooled(encoder, ids: torch.Tensor) -> torch.Tensor:
    """CLIPTextModel's pooled output (FLUX, HunyuanVideo)."""
    return encoder(ids.to(encoder.device)).pooler_output


def t5_embeds(encoder, ids: torch.Tensor) -> torch.Tensor:
    """T5 / UMT5 encoder's last hidden state; every token is real here, so the mask is all ones."""
    ids = ids.to(encoder.device)
    return encoder(ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def llama_embeds(encoder, ids: torch.Tensor, skip: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden state ``skip`` layers below the top, attention mask): HunyuanVideo's prompt embedding."""
    ids = ids.to(encoder.device)
    mask = torch.ones_like(ids)
    out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-(skip + 1)], mask
