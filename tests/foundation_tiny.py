"""Tiny random-weight BLIP, GroundingDINO and SAM, built offline, for the tests.

No weights can be downloaded here, so the foundation pipeline is exercised with the real transformers
classes built from tiny configs (a few hundred thousand parameters each) with random weights, saved with
``save_pretrained`` like a hub snapshot. The tokenizer is a WordPiece ``BertTokenizer`` over a small vocabulary
written here (BLIP and GroundingDINO both use BERT tokenizers); GroundingDINO's backbone is transformers' own
Swin (no timm, no hub). The labels they make are noise -- only the plumbing (shapes, ids, confidence ranges,
shards) is meaningful; on a machine with hub access the same code takes the real model ids (docs/foundation.md).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TINY_VOCAB", "build_tiny_foundation"]

TINY_VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "an", "the", "of", "on", "in", "with",
              "and", "picture", "photo", "dog", "cat", "bird", "car", "person", "flower", "fish", "boat", "tree",
              "object", "main", "small", "large", "red", "white", "black", "green", "sitting", "standing")


def build_tiny_foundation(root: str | Path, seed: int = 0, image_size: int = 64) -> dict[str, str]:
    """Write tiny ``captioner``, ``detector`` and ``segmenter`` model directories under ``root``.

    Returns:
        ``{"captioner": dir, "detector": dir, "segmenter": dir}``: what the ``model`` fields of
        :class:`cluster.foundation.FoundationConfig` take.
    """
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SamConfig, SamImageProcessor,
                              SamModel, SamProcessor)

    root = Path(root)
    torch.manual_seed(seed)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(TINY_VOCAB)})
    v = len(TINY_VOCAB)
    text = dict(vocab_size=v, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                max_position_embeddings=64)

    blip = BlipForConditionalGeneration(BlipConfig(
        text_config=dict(text, encoder_hidden_size=32, bos_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=image_size, patch_size=16),
        projection_dim=32))
    blip_proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tok)

    gdino = GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=dict(model_type="swin", image_size=image_size, patch_size=4, embed_dim=8,
                             depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, out_indices=[2, 3, 4]),
        text_config=dict(text, model_type="bert"),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, max_text_len=32,
        encoder_n_points=2, decoder_n_points=2))
    gdino_proc = GroundingDinoProcessor(
        # twice the side: the extra stride-64 level must stay larger than 1x1 (its GroupNorm needs 2 values)
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 2 * image_size,
                                                          "longest_edge": 3 * image_size}),
        tokenizer=tok)

    # initializer_range 0.5: mask logits of order 1 (the default 0.02 gives ~1e-5, every pixel at p = 0.5)
    sam = SamModel(SamConfig(
        initializer_range=0.5,
        vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8, window_size=4, global_attn_indexes=[0],
                           num_pos_feats=8, mlp_dim=32, initializer_range=0.02),
        prompt_encoder_config=dict(hidden_size=16, image_size=image_size, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=16)))
    low = image_size // 2
    sam_proc = SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low}))

    out = {}
    for name, model, proc in (("captioner", blip, blip_proc), ("detector", gdino, gdino_proc),
                              ("segmenter", sam, sam_proc)):
        path = root / name
        model.save_pretrained(path)
        proc.save_pretrained(path)
        out[name] = str(path)
    return out
