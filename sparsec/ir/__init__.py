"""What every pass sees: the graph context, module paths and the one site filter, the graph
edits, and typed pattern matches (linear, gated MLP, attention with its KV-cache write).

Passes, built-in or third-party, match and rewrite through these instead of walking nodes
themselves, so every family names sites, filters them and rewrites the same way
(``../shared/ARCHITECTURE.md``)."""

from ..passbase import GraphContext, Site
from .paths import SiteFilter, block_of, common_prefix, normalize_module_path, path_matches
from .patterns import (
    AttentionMatch,
    CacheMatch,
    GatedMLPMatch,
    LinearMatch,
    NoMatch,
    match_attention,
    match_gated_mlps,
    match_linear,
    match_linears,
)
from .rewrite import add_constant, fuse_horizontally, replace

__all__ = [
    "GraphContext", "Site", "SiteFilter", "block_of", "common_prefix", "normalize_module_path", "path_matches",
    "NoMatch", "LinearMatch", "match_linear", "match_linears", "GatedMLPMatch", "match_gated_mlps",
    "AttentionMatch", "CacheMatch", "match_attention", "replace", "add_constant", "fuse_horizontally",
]
