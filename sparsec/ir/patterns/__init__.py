"""Typed pattern matches over the ATen graph, each with the reason a candidate was rejected."""

from .attention import AttentionMatch, CacheMatch, match_attention
from .common import NoMatch
from .gated_mlp import GatedMLPMatch, match_gated_mlps
from .linear import LinearMatch, match_linear, match_linears

__all__ = ["NoMatch", "LinearMatch", "match_linear", "match_linears", "GatedMLPMatch", "match_gated_mlps",
           "AttentionMatch", "CacheMatch", "match_attention"]
