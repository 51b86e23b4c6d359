"""Models: the Vision Transformer and the helpers that describe its sizes."""
from coyo_vit.models.vit import VARIANTS, Model, count_params, decode_variant

__all__ = ["Model", "VARIANTS", "count_params", "decode_variant"]
