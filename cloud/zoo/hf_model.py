"""The embedded default as Hugging Face models: tiny Idefics3 (SmolVLM family) configs for the
student and the teacher, built and saved only through transformers' Auto classes.

Why Idefics3: it is a family real pocket MLLMs use (SmolVLM), llama.cpp's official converter writes
it as a ``llama`` text GGUF plus an ``idefics3`` mmproj, and libmtmd runs it -- so the default
takes exactly the code path a user's model takes.  No concrete model class is imported here (the
family seam in cloud/families/ owns those); ``AutoConfig.for_model`` and
``AutoModelForImageTextToText`` build it from plain dicts.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

IMAGE_SIZE = 32  # the world's scenes; == the preprocessor's longest edge, so libmtmd makes 1 tile + overview
SCALE_FACTOR = 2  # Idefics3's pixel-shuffle factor (2x2 patches -> one LM token)
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # SigLIP/Idefics3 normalisation, written to preprocessor_config


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of one tiny Idefics3: SigLIP-style tower, pixel-shuffle connector, Llama LM."""

    vision_dim: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp: int = 256
    patch: int = 8
    text_dim: int = 96
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 4
    text_ffn: int = 256

    def tokens_per_image(self) -> int:
        return (IMAGE_SIZE // self.patch) ** 2 // SCALE_FACTOR ** 2

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**d)


def hf_config(spec: ModelSpec, tok):
    """The ``Idefics3Config``; ``text_config.architectures`` is set because the converter picks the
    text architecture from there and transformers does not save it by itself."""
    from transformers import AutoConfig

    ids = {k: tok.convert_tokens_to_ids(getattr(tok, f"{k}_token")) for k in ("bos", "eos", "pad")}
    text = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=len(tok),
                hidden_size=spec.text_dim, intermediate_size=spec.text_ffn, num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    vision = dict(hidden_size=spec.vision_dim, intermediate_size=spec.vision_mlp, num_hidden_layers=spec.vision_layers,
                  num_attention_heads=spec.vision_heads, image_size=IMAGE_SIZE, patch_size=spec.patch)
    return AutoConfig.for_model("idefics3", vision_config=vision, text_config=text, scale_factor=SCALE_FACTOR,
                                image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
                                pad_token_id=ids["pad"])


def new_model(spec: ModelSpec, tok, seed: int):
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(hf_config(spec, tok)).float()


def load_model(path: str | Path):
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(str(path), dtype="float32")
    m.eval()
    return m


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def preprocessor_config() -> dict:
    """What libmtmd reads through the converter (mean/std, longest edge) and what an Idefics3 image
    processor accepts; written by hand so the checkpoint's bytes do not depend on torchvision."""
    return {"image_processor_type": "Idefics3ImageProcessor", "do_convert_rgb": True, "do_resize": False,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_pad": True,
            "do_image_splitting": False, "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
            "size": {"longest_edge": IMAGE_SIZE}, "max_image_size": {"longest_edge": IMAGE_SIZE}, "resample": 2}


def save_checkpoint(model, tok_dir: str | Path, spec: ModelSpec, out: str | Path) -> Path:
    """``save_pretrained`` layout (weights, config, tokenizer incl. ``tokenizer.model``,
    preprocessor) that both ``from_pretrained`` and llama.cpp's converter read."""
    from .spm_tokenizer import copy_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copy_tokenizer(tok_dir, out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2, sort_keys=True))
    (out / "cdcca_spec.json").write_text(json.dumps(asdict(spec), indent=2, sort_keys=True))
    return out
