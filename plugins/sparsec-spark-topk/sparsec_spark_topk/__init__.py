"""sparsec-spark-topk: an example out-of-tree sparsec plugin.

Calibration-free activation thresholding with Spark's "statistical top-k": instead of a
calibrated threshold, each token's threshold is estimated from the mean and standard
deviation of its own activation row, in linear time (no sort). For a row that is roughly
Gaussian, dropping the entries with ``|x - mean| <= z * std`` with ``z = Phi^-1(0.5 + p/2)``
drops about a fraction ``p`` of them.

It registers, through sparsec's hooks, one pass (``spark_topk``), the op that pass emits
(``spark_topk::stat_threshold_linear``) with its plain-torch reference and its ONNX
translation, and a recipe (``spark-50``)::

    torch.compile(model, backend="sparsec", options={"recipe": "spark-50"})
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import torch
import torch.nn.functional as F

from sparsec import Pass, RecipeError, Site, hookimpl
from sparsec.passbase import block_of, path_matches

__all__ = ["SparkTopK", "SparkTopKConfig", "stat_threshold_linear_reference", "stat_threshold_linear_onnx"]

aten = torch.ops.aten


def stat_threshold_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: float) -> torch.Tensor:
    """``W (x * 1[|x - mean(x)| > z std(x)]) + b``, statistics per row (token)."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    std = xf.std(-1, keepdim=True, correction=0)
    keep = ((xf - mean).abs() > z * std) | torch.isnan(xf)
    return F.linear(torch.where(keep, x, torch.zeros((), dtype=x.dtype)), weight, bias)


@torch.library.custom_op("spark_topk::stat_threshold_linear", mutates_args=())
def stat_threshold_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: float) -> torch.Tensor:
    return stat_threshold_linear_reference(x, weight, bias, z)


@stat_threshold_linear.register_fake
def _(x, weight, bias, z):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@dataclass
class SparkTopKConfig:
    #: fraction of each token's activations to drop, in [0, 1)
    sparsity: float = 0.5
    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])

    def validate(self) -> None:
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise RecipeError(f"sparsity must be in [0, 1), got {self.sparsity}")


class SparkTopK(Pass):
    """Statistical top-k thresholding of every linear's input (no calibration)."""

    name = "spark_topk"
    # If a recipe also thresholds with calibrated values, those sites are rewritten first and
    # this pass only sees the linears left over.
    after = ("activation_threshold",)
    config_cls = SparkTopKConfig

    def match(self, ctx, config):
        sites = []
        for node in ctx.gm.graph.nodes:
            if node.op != "call_function" or node.target is not aten.linear.default:
                continue
            w = node.args[1]
            if ctx.param_name(w) is None:
                continue
            path = ctx.site_path(node, w)
            if (config.targets and not path_matches(path, config.targets)) or path_matches(path, config.ignore):
                continue
            v = ctx.val(w)
            sites.append(Site(key=path, pass_name=self.name, kind="spark", nodes={"linear": node},
                              weights={"weight": ctx.param_name(w)}, weight_shapes={"weight": list(v.shape)},
                              weight_bytes=v.numel() * v.element_size(), block=block_of(path)))
        return sites

    def rewrite(self, ctx, sites, config, plan):
        if config.sparsity <= 0:
            return False
        z = NormalDist().inv_cdf(0.5 + config.sparsity / 2)
        g = ctx.gm.graph
        for s in sites:
            old = s.nodes["linear"]
            x, w = old.args[0], old.args[1]
            b = old.args[2] if len(old.args) > 2 else None
            with g.inserting_before(old):
                new = g.call_function(torch.ops.spark_topk.stat_threshold_linear.default, (x, w, b, z))
            new.meta.update(old.meta)
            old.replace_all_uses_with(new)
            g.erase_node(old)
        return bool(sites)


@hookimpl
def sparsec_register_passes(register):
    register(SparkTopK())


@hookimpl
def sparsec_register_kernels(register):
    register(torch.ops.spark_topk.stat_threshold_linear.default, reference=stat_threshold_linear_reference,
             description="statistical top-k thresholded linear")


def stat_threshold_linear_onnx(x, weight, bias, z: float):
    """The ONNX translation (standard opset-18 ops): the same statistics, then ``Where``."""
    from onnxscript import opset18 as op

    xf = op.Cast(x, to=1)  # FLOAT: statistics in fp32, as the reference
    mean = op.ReduceMean(xf, op.Constant(value_ints=[-1]), keepdims=1)
    centred = op.Sub(xf, mean)
    std = op.Sqrt(op.ReduceMean(op.Mul(centred, centred), op.Constant(value_ints=[-1]), keepdims=1))
    keep = op.Or(op.Greater(op.Abs(centred), op.Mul(op.Constant(value_float=float(z)), std)), op.IsNaN(xf))
    xs = op.Where(keep, x, op.CastLike(op.Constant(value_float=0.0), x))
    y = op.MatMul(xs, op.Transpose(weight, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


@hookimpl
def sparsec_register_onnx_translations(register):
    register(torch.ops.spark_topk.stat_threshold_linear.default, stat_threshold_linear_onnx)


@hookimpl
def sparsec_register_recipes(register):
    register("spark-50", {"passes": {"spark_topk": {"sparsity": 0.5}}},
             description="Spark statistical top-k, 50%, no calibration (example plugin)")
