"""Plugin loading: built-in passes, kernels and recipes are plugins exactly like third-party ones.

Built-ins are listed in ``DEFAULT_PLUGINS`` and registered first; third-party plugins come
from the entry-point group ``sparsec`` (disabled by ``SPARSEC_DISABLE_PLUGIN_AUTOLOAD=1``).
``SPARSEC_TRACE_PLUGINS=1`` prints every hook call and every registration to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from .errors import PluginError, RecipeError, did_you_mean
from .hookspecs import SparsecSpec

__all__ = ["DEFAULT_PLUGINS", "Registry", "get_registry", "reset_registry", "plugin_manager"]

#: Built-in plugins, registered through the same hooks as third-party ones (pytest's pattern).
DEFAULT_PLUGINS = (
    "sparsec.passes.activation",
    "sparsec.passes.nm",
    "sparsec.passes.rsparse",
)


def _trace(msg: str) -> None:
    if os.environ.get("SPARSEC_TRACE_PLUGINS", "") not in ("", "0"):
        print(f"[sparsec plugins] {msg}", file=sys.stderr)


@dataclass
class KernelInfo:
    op: Any
    reference: Callable
    plugin: str
    description: str = ""

    @property
    def name(self) -> str:
        return str(getattr(self.op, "_name", None) or getattr(self.op, "__name__", self.op))


@dataclass
class TranslationInfo:
    op: Any
    fn: Callable
    plugin: str


@dataclass
class RecipeInfo:
    name: str
    recipe: dict
    plugin: str
    description: str = ""


@dataclass
class Registry:
    """Everything the loaded plugins registered, each entry tagged with its plugin's name."""

    pm: pluggy.PluginManager
    passes: dict[str, Any] = field(default_factory=dict)
    pass_plugin: dict[str, str] = field(default_factory=dict)
    kernels: dict[str, KernelInfo] = field(default_factory=dict)
    recipes: dict[str, RecipeInfo] = field(default_factory=dict)
    #: op name ("ns::name") -> its Lowering (sparsec.codegen), in registration order
    lowerings: dict[str, Any] = field(default_factory=dict)
    lowering_plugin: dict[str, str] = field(default_factory=dict)
    _onnx: dict[str, TranslationInfo] | None = None
    _decompositions: dict[str, TranslationInfo] | None = None
    _dense_forms: dict[str, TranslationInfo] | None = None

    def onnx_translations(self) -> dict[str, TranslationInfo]:
        """Op name -> its ONNX translation; the hook runs on first use (it imports onnxscript)."""
        if self._onnx is None:
            self._onnx = self._table("sparsec_register_onnx_translations", "ONNX translation")
        return self._onnx

    def decompositions(self) -> dict[str, TranslationInfo]:
        """Op name -> its ATen decomposition for MLIR; the hook runs on first use."""
        if self._decompositions is None:
            self._decompositions = self._table("sparsec_register_decompositions", "decomposition")
        return self._decompositions

    def dense_forms(self) -> dict[str, TranslationInfo]:
        """Op name -> how it is written with a dense weight (exports); the hook runs on first use."""
        if self._dense_forms is None:
            self._dense_forms = self._table("sparsec_register_dense_forms", "dense form")
        return self._dense_forms

    def _table(self, hook: str, what: str) -> dict[str, TranslationInfo]:
        table: dict[str, TranslationInfo] = {}

        def make_register(plugin_name):
            def register(op, fn):
                name = KernelInfo(op=op, reference=fn, plugin=plugin_name).name
                if not callable(fn):
                    raise PluginError(f"plugin {plugin_name!r}: the {what} of {name!r} is not callable")
                if name in table:
                    raise PluginError(f"two {what}s for op {name!r}: from plugin {table[name].plugin!r} "
                                      f"and from plugin {plugin_name!r}")
                table[name] = TranslationInfo(op=op, fn=fn, plugin=plugin_name)
                _trace(f"  {what} {name!r} from {plugin_name}")

            return register

        _call_each(self.pm, hook, make_register)
        return table

    def get_pass(self, name: str):
        if name not in self.passes:
            raise RecipeError(f"unknown pass {name!r}{did_you_mean(name, self.passes)}")
        return self.passes[name]


def plugin_manager(load_entrypoints: bool | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager with the default plugins and (unless disabled) entry points."""
    pm = pluggy.PluginManager("sparsec")
    pm.add_hookspecs(SparsecSpec)
    for modname in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
    if load_entrypoints is None:
        load_entrypoints = os.environ.get("SPARSEC_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    if load_entrypoints:
        pm.load_setuptools_entrypoints("sparsec")
    if os.environ.get("SPARSEC_TRACE_PLUGINS", "") not in ("", "0"):
        pm.trace.root.setwriter(lambda m: print(f"[sparsec plugins] {m}", end="", file=sys.stderr))
        pm.enable_tracing()
    _trace("loaded: " + ", ".join(name for name, _ in pm.list_name_plugin()))
    return pm


def _call_each(pm: pluggy.PluginManager, hook_name: str, make_register: Callable[[str], Callable]) -> None:
    """Call one hook plugin by plugin, handing each a ``register`` that knows who is calling.

    pluggy's normal call gives every implementation the same arguments, so a shared callback
    could not say which plugin registered what; a per-plugin callback can (llm does the same).
    """
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():  # registration order: built-ins first
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        _trace(f"{hook_name}() -> {plugin_name}")
        register = make_register(plugin_name)
        kwargs = {"register": register}
        try:
            impl.function(*[kwargs[a] for a in impl.argnames])
        except (PluginError, RecipeError):
            raise
        except Exception as exc:  # the plugin's own bug: name it, keep the cause chained
            raise PluginError(f"plugin {plugin_name!r} raised in {hook_name}: {type(exc).__name__}: {exc}") from exc


def build_registry(pm: pluggy.PluginManager) -> Registry:
    reg = Registry(pm=pm)

    def pass_register(plugin_name):
        def register(p):
            name = getattr(p, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {plugin_name!r} registered a pass without a name: {p!r}")
            for attr in ("match", "rewrite"):
                if not callable(getattr(p, attr, None)):
                    raise PluginError(f"plugin {plugin_name!r}: pass {name!r} has no {attr}() method")
            if name in reg.passes:
                raise PluginError(
                    f"two passes named {name!r}: one from plugin {reg.pass_plugin[name]!r}, "
                    f"one from plugin {plugin_name!r}"
                )
            reg.passes[name] = p
            reg.pass_plugin[name] = plugin_name
            _trace(f"  pass {name!r} from {plugin_name}")

        return register

    def kernel_register(plugin_name):
        def register(op, reference, description=""):
            info = KernelInfo(op=op, reference=reference, plugin=plugin_name, description=description)
            if info.name in reg.kernels:
                raise PluginError(
                    f"two kernels for op {info.name!r}: from plugin {reg.kernels[info.name].plugin!r} "
                    f"and from plugin {plugin_name!r}"
                )
            reg.kernels[info.name] = info
            _trace(f"  kernel {info.name!r} from {plugin_name}")

        return register

    def recipe_register(plugin_name):
        def register(name, recipe, description=""):
            if name in reg.recipes:
                raise PluginError(
                    f"two recipes named {name!r}: from plugin {reg.recipes[name].plugin!r} and from plugin {plugin_name!r}"
                )
            reg.recipes[name] = RecipeInfo(name=name, recipe=recipe, plugin=plugin_name, description=description)
            _trace(f"  recipe {name!r} from {plugin_name}")

        return register

    def lowering_register(plugin_name):
        def register(op, lowering):
            from .codegen import Lowering

            name = op if isinstance(op, str) else KernelInfo(op=op, reference=None, plugin=plugin_name).name
            if not isinstance(lowering, Lowering):
                raise PluginError(f"plugin {plugin_name!r}: the lowering of {name!r} must be a sparsec.codegen.Lowering, "
                                  f"got {type(lowering).__name__}")
            if name in reg.lowerings:
                raise PluginError(f"two lowerings for op {name!r}: from plugin {reg.lowering_plugin[name]!r} "
                                  f"and from plugin {plugin_name!r}")
            reg.lowerings[name] = lowering
            reg.lowering_plugin[name] = plugin_name
            _trace(f"  lowering {name!r} from {plugin_name}")

        return register

    _call_each(pm, "sparsec_register_kernels", kernel_register)
    _call_each(pm, "sparsec_register_passes", pass_register)
    _call_each(pm, "sparsec_register_recipes", recipe_register)
    _call_each(pm, "sparsec_register_lowerings", lowering_register)
    return reg


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use (never as an import side effect)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry(plugin_manager())
    return _REGISTRY


def reset_registry(registry: Registry | None = None) -> None:
    """Drop (or replace) the cached registry; tests use it after registering plugins."""
    global _REGISTRY
    _REGISTRY = registry
