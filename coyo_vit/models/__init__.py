"""Models: the Vision Transformer and the helpers that describe its sizes."""
from coyo_vit.models.vit import SPEED_OPTIONS, VARIANTS, Model, count_params, decode_variant

__all__ = ["Model", "SPEED_OPTIONS", "VARIANTS", "count_params", "decode_variant"]
