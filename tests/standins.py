"""Stand-in foundation-model snapshots in the real hub layouts, built offline with random weights.

Tiny ones keep the default tests fast; `full_size=True` builds the published architectures (BiomedCLIP ViT-B/16 +
BERT-base, RAD-DINO ViT-B/14 at 518 px) from the configuration files the hub repositories hold, so a loader that
reads them needs no change for the real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: The hub repository's open_clip_config.json (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224).
BIOMEDCLIP_OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}

#: BERT-base (uncased, PubMed vocabulary of 30522 word pieces): the text tower's config.json.
BIOMEDBERT_CONFIG = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30522,
                     "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                     "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
                     "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0}

#: microsoft/rad-dino preprocessor_config.json.
RAD_DINO_PREPROCESSOR = {"crop_size": {"height": 518, "width": 518}, "do_center_crop": True, "do_convert_rgb": True,
                         "do_normalize": True, "do_rescale": True, "do_resize": True,
                         "image_mean": [0.5307, 0.5307, 0.5307], "image_processor_type": "BitImageProcessor",
                         "image_std": [0.2583, 0.2583, 0.2583], "resample": 3,
                         "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 518}}

#: microsoft/rad-dino config.json (Dinov2 ViT-B/14).
RAD_DINO_CONFIG = {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 768,
                   "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4, "patch_size": 14,
                   "image_size": 518, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                   "layerscale_value": 1.0, "qkv_bias": True, "use_swiglu_ffn": False, "drop_path_rate": 0.0}

_WORDS = ("this is a photo of knee chest hand pelvis spine skull foot x - ray with no doubtful minimal moderate severe "
          "osteoarthritis").split()


def _tiny_open_clip_config() -> dict:
    cfg = json.loads(json.dumps(BIOMEDCLIP_OPEN_CLIP_CONFIG))
    cfg["model_cfg"].update(embed_dim=16)
    cfg["model_cfg"]["vision_cfg"].update(timm_model_name="test_vit", image_size=32)
    cfg["model_cfg"]["text_cfg"].update(context_length=16)
    return cfg


def _write_tokenizer(dest: Path, words: list[str]) -> None:
    from transformers import BertTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(dest)
    (dest / "vocab.txt").write_text("\n".join(vocab) + "\n")


def build_biomedclip(dest: Path, *, seed: int = 0, full_size: bool = False, text_dir: bool = True) -> Path:
    """A BiomedCLIP-layout snapshot: open_clip_config.json, open_clip_pytorch_model.bin, tokenizer files, and the
    text tower's config.json in `text/` (omitted with text_dir=False, to test that error)."""
    import open_clip

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = BIOMEDCLIP_OPEN_CLIP_CONFIG if full_size else _tiny_open_clip_config()
    bert = dict(BIOMEDBERT_CONFIG) if full_size else dict(
        BIOMEDBERT_CONFIG, vocab_size=5 + len(_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32)
    (dest / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    _write_tokenizer(dest, _WORDS)
    text = dest / "text"
    text.mkdir(exist_ok=True)
    (text / "config.json").write_text(json.dumps(bert, indent=2))
    torch.manual_seed(seed)
    text_cfg = dict(cfg["model_cfg"]["text_cfg"], hf_model_name=str(text), hf_model_pretrained=False)
    model = open_clip.create_model(f"local-dir:{dest}", pretrained_text=False, text_cfg=text_cfg)
    torch.save(model.state_dict(), dest / "open_clip_pytorch_model.bin")
    if not text_dir:
        (text / "config.json").unlink()
        text.rmdir()
    return dest


def build_raddino(dest: Path, *, seed: int = 0, full_size: bool = False) -> Path:
    """A RAD-DINO-layout snapshot: config.json + model.safetensors (save_pretrained) and preprocessor_config.json."""
    from transformers import Dinov2Config, Dinov2Model

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = dict(RAD_DINO_CONFIG) if full_size else dict(RAD_DINO_CONFIG, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, image_size=28)
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**{k: v for k, v in cfg.items() if k != "architectures"})).save_pretrained(dest)
    pre = dict(RAD_DINO_PREPROCESSOR)
    if not full_size:
        pre.update(crop_size={"height": 28, "width": 28}, size={"shortest_edge": 28})
    (dest / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return dest


def build_kneessl(dest: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A `kneeoa pretrain` encoder folder (two-branch CNN, random weights): model.safetensors + config.json."""
    from safetensors.torch import save_file

    from kneeoa.models.cnn.twobranch import TwoBranchNet

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = TwoBranchNet(in_chans=1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(json.dumps({
        "backbone": "twobranch", "image_size": image_size, "mean": 0.5, "std": 0.25, "feature_dim": net.num_features,
        "in_chans": 1, "method": "simclr", "n_images": 0, "epochs": 0}))
    return dest
