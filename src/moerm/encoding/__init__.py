"""The encoding layer below the systems: backbones, pair encoding, tuning modes, adapters and caches.

    backbone.py  load any HF encoder/decoder (safetensors only), pooling, dtype, gradient checkpointing
    pairs.py     prompt/response -> token ids (token-exact truncation, chat templates for decoders)
    tuning.py    one parsed tuning spec (full | lora | frozen | top) and the one function that applies it to a backbone
    adapters.py  encode a batch through named LoRA adapters (one mixed batch, or grouped passes)
    cache.py     backbone identity and the frozen-feature cache (one keying scheme)
"""

from moerm.encoding.backbone import (
    ALIASES, DECODER_TYPES, DTYPES, Backbone, BackboneError, backbone_kwargs, decoder_position_ids, is_decoder,
    load_backbone, load_config, load_tokenizer, pooled, resolve_dtype, resolve_model_path, resolve_pooling,
)
from moerm.encoding.cache import FeatureCache, backbone_id, default_cache_dir, encode_features, weights_digest
from moerm.encoding.pairs import PairEncoder, hh_messages, make_encoder

__all__ = [
    "ALIASES", "DECODER_TYPES", "DTYPES", "Backbone", "BackboneError", "FeatureCache", "PairEncoder", "backbone_id",
    "backbone_kwargs", "decoder_position_ids", "default_cache_dir", "encode_features", "hh_messages", "is_decoder",
    "load_backbone", "load_config", "load_tokenizer", "make_encoder", "pooled", "resolve_dtype",
    "resolve_model_path", "resolve_pooling", "weights_digest",
]
