"""CLoVE (Contextualized Local Visual Embeddings) for timm backbones."""

__version__ = "0.1.0"
