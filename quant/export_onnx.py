"""Export to ONNX: the float model, and our own fake-quantized CNN or ViT as a QDQ graph.

`export_qdq` writes the grids `quant.quantize` calibrated, as the QDQ convention every
ONNX backend reads (ONNX Runtime, TensorRT, OpenVINO):

- each quantized conv/linear weight is an int8 (signed grid) or uint8 initializer holding the
  integer weight (hard AdaRound decision or nearest rounding), with its per-channel scales and
  integer zero points, into `DequantizeLinear(axis=0)` -> Conv/Gemm, so the float weight the graph
  sees is bit-for-bit the one the fake-quant model uses;
- each activation quantizer (`quant.modules.QuantAct`, per-tensor, unsigned) becomes a
  `QuantizeLinear -> DequantizeLinear` pair (uint8) at the same place in the graph, with our
  calibrated (LSQ-learned) scale and zero point.

The ViT path's layers (`quant.vit.layers`) export the same way: Linear and patch-embedding weights
as integers + DequantizeLinear, their per-tensor input grids and the uniform operands of the
attention products as Q/DQ pairs; the post-softmax log grid has no affine form and is exported as
its float emulation (Log, Round, Clip, Pow, Where).

A b-bit grid with b < 8 lies inside the 8-bit type but the type saturates only at its own ends, so
a `Clip` to the grid's float range `[(qmin - z) s, (qmax - z) s]` precedes the QuantizeLinear:
`Clip -> Q -> DQ` equals our `clamp(round(x / s) + z, qmin, qmax)` exactly (the clip bounds are grid
points). 8-bit grids need no Clip. Biases stay float.

How: the model is deep-copied, each fake-quant op in the copy is replaced by a
`torch.autograd.Function` whose `symbolic` emits the Q/DQ nodes, and the copy goes through the
TorchScript exporter (`torch.onnx.export(..., dynamo=False)`). `check=True` runs the file in ONNX
Runtime on the example input and compares it with the fake-quant model.

onnx (and onnxruntime for `check`/`run_onnx`) are optional dependencies (`pip install dfq[onnx]`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import QuantError
from .fold import set_submodule
from .modules import QuantAct, QuantConv2d, QuantLinear
from .quantizers import UniformQuantizer
from .vit.layers import QuantMatMul
from .vit.quantizers import LogQuantizer

INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_OPSET = 17  # QuantizeLinear per-axis needs 13; 17 is what every current backend reads


# ----------------------------------------------------------------------------- float export


def export_fp(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> Path:
    """Export a float model to ONNX (TorchScript exporter; input `input`, output `logits`).

    The batch axis is dynamic unless `dynamic_batch=False`. BatchNorm is folded into the conv by
    the exporter in eval mode. Returns `path`. This is the input `quant.ort_calib` quantizes.
    """
    return _export(model.eval(), example_input, Path(path), opset, dynamic_batch)


def _export(
    model: nn.Module, example_input: torch.Tensor, path: Path, opset: int, dynamic_batch: bool
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (example_input,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
            )
    except ImportError as e:
        raise QuantError(f"ONNX export needs the onnx package (pip install dfq[onnx]): {e}") from None
    _bypass_initializer_identities(path)
    return path


def _bypass_initializer_identities(path: Path) -> None:
    """Point consumers of `Identity(initializer)` at the initializer itself and drop the Identity.

    The TorchScript exporter shares equal initializers (two activation grids with zero point 0)
    through Identity nodes; QDQ consumers (ORT's QDQ selectors, TensorRT) want a Q/DQ scale and
    zero point to *be* initializers.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs
    }
    if not alias:
        return
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(model, str(path))


# ----------------------------------------------------------------------------- QDQ ops


class _ActQDQ(torch.autograd.Function):
    """Per-tensor fake quantization that exports as [Clip ->] QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, lo, hi, qmin: int, qmax: int, clip: bool):
        z = zero_point.to(x.dtype)
        return (torch.clamp(torch.round(x / scale) + z, qmin, qmax) - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, lo, hi, qmin, qmax, clip):
        if clip:
            x = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


class _WeightDQ(torch.autograd.Function):
    """An integer weight with its scales and zero points; exports as DequantizeLinear(axis)."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis: int | None):
        shape = [1] * q.dim()
        if axis is not None:
            shape[axis] = -1
        return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        if axis is None:
            return g.op("DequantizeLinear", q, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


def _int_dtype(qmin: int, qmax: int, what: str) -> torch.dtype:
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    if -128 <= qmin and qmax <= 127:
        return torch.int8
    raise QuantError(f"{what}: grid [{qmin}, {qmax}] fits neither int8 nor uint8")


def _type_range(dtype: torch.dtype) -> tuple[int, int]:
    return (0, 255) if dtype == torch.uint8 else (-128, 127)


class _ExportAct(nn.Module):
    """Stands in for a per-tensor activation grid in the export copy (a `QuantAct`'s, or a ViT
    layer's input quantizer): the grid as constants, QDQ on the way out."""

    # read by the ViT layers' "needs calibration?" check: this grid is final
    enabled, observing, initialized = True, False, True

    def __init__(self, q: UniformQuantizer, name: str) -> None:
        super().__init__()
        if q.scale.numel() != 1:
            raise QuantError(f"{name}: per-channel activation grid; export needs per-tensor ones")
        scale = q.scale.detach().float().reshape(())
        zp = q.zero_point.detach().float().reshape(())
        if zp != zp.round() or not (q.qmin <= zp <= q.qmax):
            raise QuantError(f"{name}: zero point {float(zp)} is not an integer in [{q.qmin}, {q.qmax}]")
        dtype = _int_dtype(q.qmin, q.qmax, name)
        self.qmin, self.qmax = int(q.qmin), int(q.qmax)
        self.clip = (self.qmin, self.qmax) != _type_range(dtype)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zp.to(dtype))
        self.register_buffer("lo", ((self.qmin - zp) * scale).reshape(()))
        self.register_buffer("hi", ((self.qmax - zp) * scale).reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ActQDQ.apply(
            x, self.scale, self.zero_point, self.lo, self.hi, self.qmin, self.qmax, self.clip
        )


def _integer_weight(
    layer: nn.Module, name: str, wq: UniformQuantizer | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(integer weight, scale, zero point, qmin, qmax) of the weight the layer's forward uses
    (its AdaRound decision if it has one, else nearest rounding on `wq`, default the layer's own)."""
    w = layer.weight.detach().float()
    if layer.ada is not None:
        ada = layer.ada
        if ada.soft:
            raise QuantError(f"{name}: AdaRound rounding is still soft (reconstruction not finished)")
        q = ada.integer_weight()
        scale, zp, qmin, qmax = ada.scale.detach(), ada.zero_point.detach(), ada.qmin, ada.qmax
    else:
        if wq is None:
            layer.calibrate_weight()
            wq = layer.weight_quantizer
        scale, zp = wq.shaped(w)
        scale, zp, qmin, qmax = scale.detach(), zp.detach(), wq.qmin, wq.qmax
        q = torch.clamp(torch.round(w / scale) + zp, qmin, qmax)
    return q, scale.float().expand_as(w), zp.float().expand_as(w), int(qmin), int(qmax)


def _per_channel(t: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """The per-output-channel values of a tensor broadcast over a weight (constant over dims > 0)."""
    first = t.reshape(t.shape[0], -1)[:, 0]
    if not torch.equal(t, first.reshape(-1, *[1] * (t.dim() - 1)).expand_as(t)):
        raise QuantError(f"{name}: weight {what} is not per output channel")
    return first.contiguous()


class _ExportWeight(nn.Module):
    """An integer weight + per-channel grid that exports as DequantizeLinear (call it with anything)."""

    def __init__(self, q, scale, zero_point, axis: int | None) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    def forward(self, *_ignored: torch.Tensor) -> torch.Tensor:
        return _WeightDQ.apply(self.q, self.scale, self.zero_point, self.axis)


def _weight_dq(layer: nn.Module, name: str, wq: UniformQuantizer | None = None) -> _ExportWeight:
    """The layer's quantized weight as an `_ExportWeight` (integers, scales, zero points)."""
    q, scale, zp, qmin, qmax = _integer_weight(layer, name, wq)
    dtype = _int_dtype(qmin, qmax, name)
    scale_c, zp_c = _per_channel(scale, name, "scale"), _per_channel(zp, name, "zero point")
    if not torch.equal(zp_c, zp_c.round()):
        raise QuantError(f"{name}: weight zero points are not integers")
    per_tensor = bool((scale_c == scale_c[0]).all() and (zp_c == zp_c[0]).all())
    axis = None if per_tensor else 0
    if per_tensor:
        scale_c, zp_c = scale_c[0], zp_c[0]
    return _ExportWeight(q.to(dtype), scale_c.clone(), zp_c.to(dtype), axis)


def _attach_weight_dq(layer: QuantConv2d | QuantLinear, name: str) -> None:
    """Make `layer.quantized_weight()` (in the copy) a DequantizeLinear of its integer weight."""
    w = _weight_dq(layer, name)
    layer.register_buffer("onnx_qweight", w.q)
    layer.register_buffer("onnx_wscale", w.scale)
    layer.register_buffer("onnx_wzero_point", w.zero_point)
    # an instance attribute shadows the class method: the layer's own forward stays in charge
    layer.quantized_weight = lambda: _WeightDQ.apply(  # type: ignore[method-assign]
        layer.onnx_qweight, layer.onnx_wscale, layer.onnx_wzero_point, w.axis
    )


def _is_quantizer(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Quantizer") and getattr(module, "enabled", True)


@dataclass
class QDQExport:
    """What `export_qdq` wrote and, with `check`, how the ONNX file agrees with the fake-quant model."""

    path: Path
    weight_layers: int  # conv/linear weights stored as integers + DequantizeLinear
    act_quantizers: int  # Q -> DQ pairs on activations
    max_abs_diff: float | None = None  # ORT (optimiser off: ONNX semantics) vs fake-quant logits
    logit_scale: float | None = None  # max |logit| of the fake-quant model on the example input
    argmax_agreement: float | None = None
    max_abs_diff_optimized: float | None = None  # ORT with its default (integer-kernel) optimiser
    argmax_agreement_optimized: float | None = None


def qdq_copy(qmodel: nn.Module) -> tuple[nn.Module, int, int]:
    """A deep copy of `qmodel` whose fake-quant ops export as QDQ nodes; (copy, weights, acts).

    Numerically it computes what `qmodel` computes (weights exactly, activations up to float
    rounding at grid midpoints), so it can be run in PyTorch to check the export.
    """
    model = copy.deepcopy(qmodel).eval()
    model.requires_grad_(False)
    n_weights = n_acts = 0
    handled: set[int] = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantAct):
            handled.update(id(m) for m in module.modules())
            if module.enabled and module.quant.enabled:
                set_submodule(model, name, _ExportAct(module.quant, name))
                n_acts += 1
            else:
                set_submodule(model, name, nn.Identity())
        elif isinstance(module, (QuantConv2d, QuantLinear)):
            parts = (module.weight_quantizer, module.ada, module.input_quantizer)
            handled.update(id(m) for q in parts if q is not None for m in q.modules())
            if module.quant_weight and module.weight_quantizer.enabled:
                _attach_weight_dq(module, name)
                n_weights += 1
            if module.input_quantizer is not None and module.quant_act:
                n_acts += _act_to_qdq(module, "input_quantizer", name)
        elif isinstance(module, QuantMatMul):
            handled.update(id(m) for m in module.modules())
            if module.quant_act:
                n_acts += _act_to_qdq(module, "quantizer_a", name) + _act_to_qdq(module, "quantizer_b", name)
    others = [n for n, m in model.named_modules() if _is_quantizer(m) and id(m) not in handled]
    if others:
        raise QuantError(
            f"export_qdq handles the fake-quant modules of quant.modules and quant.vit; {len(others)} "
            f"other quantizers are active (e.g. {others[0]})"
        )
    return model, n_weights, n_acts


def _act_to_qdq(parent: nn.Module, attr: str, name: str) -> int:
    """Replace a per-tensor input grid by Q/DQ; 1 if replaced. Post-softmax log grids have no QDQ
    form (ONNX's Q/DQ are affine): they stay as their float emulation (Log, Round, Clip, Pow), which
    every backend runs, and are not counted."""
    q = getattr(parent, attr)
    if isinstance(q, LogQuantizer) or not q.enabled:
        return 0
    setattr(parent, attr, _ExportAct(q, f"{name}.{attr}"))
    return 1


def export_qdq(
    qmodel: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    check: bool = True,
) -> QDQExport:
    """Export a model returned by `quant.quantize` (or `quant.load`) as a QDQ ONNX file.

    Integer weights with per-channel scales/zero points -> DequantizeLinear(axis=0), calibrated
    per-tensor activation grids -> [Clip ->] QuantizeLinear -> DequantizeLinear (uint8), at the places
    our quantizers sit (module docstring). Input `input` (float, batch axis dynamic unless
    `dynamic_batch=False`), output `logits`. `check` runs the file in ONNX Runtime on
    `example_input` and records the agreement with `qmodel` in the returned `QDQExport`.


    The graph's ONNX semantics equal the fake-quant model up to float summation order
    (`max_abs_diff`, run with ORT's graph optimiser off). ORT's default optimiser executes QDQ
    groups as integer kernels (bias requantized to int32 at s_x * s_w, fused requantization), so
    `max_abs_diff_optimized` is larger at 4 bits: that is ORT's integer arithmetic, not the export.
    """
    model, n_weights, n_acts = qdq_copy(qmodel)
    if n_weights == 0 and n_acts == 0:
        raise QuantError("no active quantizer found: pass a model returned by quant.quantize")
    out = _export(model, example_input, Path(path), opset, dynamic_batch)
    result = QDQExport(out, n_weights, n_acts)
    if check:
        with torch.no_grad():
            ref = qmodel.eval()(example_input).float().cpu().numpy()
        result.logit_scale = float(np.abs(ref).max())
        for suffix, optimize in (("", False), ("_optimized", True)):
            got = run_onnx(out, example_input, optimize=optimize)
            setattr(result, f"max_abs_diff{suffix}", float(np.abs(got - ref).max()))
            if ref.ndim == 2:
                setattr(result, f"argmax_agreement{suffix}", float((got.argmax(1) == ref.argmax(1)).mean()))
    return result


# ----------------------------------------------------------------------------- running


def run_onnx(
    path: str | os.PathLike,
    inputs: torch.Tensor | np.ndarray,
    batch_size: int | None = None,
    providers: list[str] | None = None,
    optimize: bool = True,
) -> np.ndarray:
    """Outputs of the ONNX model at `path` (first output) on `inputs`, batched, as float32 numpy.

    `batch_size=None` runs everything at once (the model's batch axis must be dynamic when it
    differs from the export's). `providers` default to ONNX Runtime's CPU provider. `optimize=False`
    turns ORT's graph optimiser off, so QDQ nodes run as written (the ONNX reference semantics).
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise QuantError(f"running ONNX needs onnxruntime (pip install dfq[onnx]): {e}") from None
    x = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    x = np.ascontiguousarray(x, dtype=np.float32)
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    step = batch_size or max(1, len(x))
    outs = [session.run(None, {name: x[i : i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate(outs).astype(np.float32, copy=False)
