"""Module paths of sites, and the one targets/ignore filter every pass uses."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..passbase import block_of, normalize_module_path, path_matches

__all__ = ["SiteFilter", "block_of", "common_prefix", "normalize_module_path", "path_matches"]


def common_prefix(paths: list[str]) -> str:
    """The longest module path all ``paths`` lie in (``a.b.c``, ``a.b.d`` -> ``a.b``)."""
    out = []
    for seg in zip(*(p.split(".") for p in paths)):
        if len(set(seg)) != 1:
            break
        out.append(seg[0])
    return ".".join(out)


@dataclass(frozen=True)
class SiteFilter:
    """``targets`` (empty: every site) and ``ignore`` module-path patterns, as recipes give them.

    A pattern matches a path that is it, lies below it, or fnmatches it, also as a suffix
    (``lm_head`` and ``mlp.*`` match anywhere): ``path_matches``.
    """

    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, config) -> "SiteFilter":
        """The filter of a pass config with ``targets`` / ``ignore`` fields (either may be absent)."""
        return cls(tuple(getattr(config, "targets", ()) or ()), tuple(getattr(config, "ignore", ()) or ()))

    def why_not(self, path: str) -> str | None:
        """Why ``path`` is filtered out, or ``None`` when it is wanted."""
        if self.targets and not path_matches(path, self.targets):
            return f"{path!r} is not among the targets {list(self.targets)}"
        if self.ignore and path_matches(path, self.ignore):
            return f"{path!r} is ignored ({list(self.ignore)})"
        return None

    def __call__(self, path: str) -> bool:
        return self.why_not(path) is None
