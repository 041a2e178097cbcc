"""Export a DiJiang model into one ONNX step graph that carries the state.

Inputs: ``input_ids [B, L]`` int64, ``attention_mask [B, L]`` int64 (0 =
padding), ``past_position [B]`` int64 (real tokens already consumed per row),
``past_state.{i} [B, H, d, d]`` float32. Outputs: ``logits`` (``[B, 1, V]``
or ``[B, L, V]``) and ``present_state.{i}``. ``L = 1`` is decode, ``L > 1`` a
prefill chunk.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ..checkpoint import load_model
from ..contract.atomic import atomic_dir
from ..contract.chat import ChatFormat, load_chat_template
from ..contract.errors import DiJiangError, ExportError
from ..contract.manifest import Manifest, TensorSpec, graph_sha256
from ..contract.names import (
    CHAT_FORMAT_FILE,
    OP_TYPE,
    PORTABLE_OPSET,
    STANDARD_OPSET,
    TOKENIZER_FILES,
)
from ..modeling.model import DiJiangForCausalLM, DiJiangState
from ..quantization.calibrate import CalibrationConfig, calibrate_for_quantization, calibration_ids
from ..quantization.grid import ON_GRID_TOLERANCE, WeightGrid, recorded_grid
from ..quantization.nbits import BITS, DEFAULT_ACCURACY_LEVEL, quantization_info, quantize_weights
from . import ops
from .direct import DIRECT_OPSET, build_step_graph
from .flavors import FLAVORS, apply_flavor
from .onnx_io import EXTERNAL_DATA_BYTES, ExternalData, reload_external_data, save_graph
from .op_counts import decode_op_counts
from .schema import register_schema

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
#: ``--attention-op`` values: the traced flavors plus ``inline`` (the graph
#: built directly with the recurrence as standard ops, see :mod:`.direct`).
ATTENTION_OPS = ("auto", *FLAVORS, "inline")


@dataclass
class ExportOptions:
    """What to export.

    Attributes:
        dtype: ``fp32`` or ``fp16`` weights/activations; the recurrence and
            its state stay float32 either way.
        logits: ``last`` (``[B, 1, V]``, generation) or ``all`` (scoring).
        attention_op: ``linear-attention``, ``function`` or ``plugin`` (the
            traced graph, recurrence as one node per layer) or ``inline``
            (built directly, recurrence as standard ops; fastest on ONNX
            Runtime CPU, float32 activations, geometric decay only).
            ``auto`` (default) picks ``inline`` where it applies and
            ``linear-attention`` otherwise (fp16, general decay tables).
        max_chunk: the prefill chunk length the runtime should feed.
        weights: ``fp32``/``fp16`` (same as ``dtype``) or ``int8``/``int4``
            weight-only quantization of the linear layers (see
            :mod:`.quantize`); the state path is never quantized.
        block_size: quantization block length along the input dimension.
        symmetric: symmetric (no zero point) or asymmetric blocks; None
            (default): the grid a quantization-aware fine-tune trained the
            checkpoint on (``finetune --quant-aware``) when the block size
            matches; else asymmetric for int4 ``inline`` graphs, which only
            ONNX Runtime reads and where zero points cost no speed (SmolLM2:
            perplexity +3.1% instead of +11.4%, 101 tokens/s both),
            symmetric otherwise (TensorRT requires zero zero-points; int8
            gained nothing from them).
        quantize_head: also quantize the LM head (at 8 bits, see
            :data:`.quantize.HEAD_BITS`); None (default): yes for int4, where
            it is the largest matrix (a third of SmolLM2's int4 step without
            it), no for int8, the accuracy-first format: ONNX Runtime's fast
            8-bit kernel rounds the head's activations to int8, which cost
            1.7-2.0 points of top-1 agreement with float32 on fine-tuned
            SmolLM2 (96.97% -> 98.63%, 95.80% -> 97.75%) for 6% of decode
            speed (docs/quantization.md).
        calibrate: before int8/int4 quantization, rescale input channels
            by activation statistics (:mod:`.calibrate`; exact in float,
            int4 SmolLM2 top-1 agreement 53% -> 75-77%). Off: plain RTN.
            Skipped when the weights already lie on the export's grid
            (:func:`lossless_on_grid`): rounding them again changes nothing.
        calibration_data: text file or folder for the calibration pass;
            None: the built-in local corpus.
        calibration_tokens: tokens of calibration text.
        accuracy_level: ``MatMulNBits.accuracy_level`` of the body's
            int8/int4 nodes (ONNX Runtime's compute precision: 4 rounds
            activations to int8 inside the kernel, 0 keeps them float32);
            None: 4, the fast one. The 8-bit head of an int4 graph stays at
            4: ONNX Runtime 1.32 has no fast float32-activation kernel for
            8-bit weights (>10x slower), which also makes level 0 a poor
            choice for int8 exports. See docs/quantization.md for measured
            speed and agreement.
    """

    dtype: str = "fp32"
    logits: str = "last"
    attention_op: str = "auto"
    max_chunk: int = 64
    weights: str | None = None
    block_size: int = 32
    symmetric: bool | None = None
    quantize_head: bool | None = None
    calibrate: bool = True
    calibration_data: str | None = None
    calibration_tokens: int = 1024
    accuracy_level: int | None = None

    @property
    def weight_format(self) -> str:
        return self.weights or self.dtype

    @property
    def head_quantized(self) -> bool:
        """``quantize_head`` resolved: None means int4 yes, int8 no."""
        return self.quantize_head if self.quantize_head is not None else self.weight_format == "int4"

    def validate(self) -> None:
        if self.dtype not in ("fp32", "fp16"):
            raise DiJiangError(f"--dtype must be fp32 or fp16, got {self.dtype!r}")
        if self.logits not in ("last", "all"):
            raise DiJiangError(f"--logits must be last or all, got {self.logits!r}")
        if self.attention_op not in ATTENTION_OPS:
            raise DiJiangError(f"--attention-op must be one of {', '.join(ATTENTION_OPS)}, got {self.attention_op!r}")
        if not 1 <= self.max_chunk <= 4096:
            raise DiJiangError(f"--max-chunk must be in 1..4096, got {self.max_chunk}")
        if self.weight_format not in ("fp32", "fp16", "int8", "int4"):
            raise DiJiangError(f"--weights must be fp32, fp16, int8 or int4, got {self.weights!r}")
        if self.weights in ("fp32", "fp16") and self.weights != self.dtype:
            raise DiJiangError(f"--weights {self.weights} contradicts --dtype {self.dtype}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise DiJiangError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.calibration_tokens < 2:
            raise DiJiangError(f"--calibration-tokens must be at least 2, got {self.calibration_tokens}")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise DiJiangError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")
        if self.calibration_data is not None and not Path(self.calibration_data).exists():
            raise DiJiangError(f"--calibration-data {self.calibration_data}: no such file or folder")


def auto_attention_op(dtype: str, geometric: bool) -> str:
    """What ``auto`` becomes: ``inline`` for float32 graphs of geometric-decay models, else ``linear-attention``."""
    return "inline" if dtype == "fp32" and geometric else "linear-attention"


def resolve_attention_op(model: DiJiangForCausalLM, options: ExportOptions) -> ExportOptions:
    """``options`` with ``auto`` replaced by :func:`auto_attention_op` for
    ``model``, and ``symmetric=None`` by :func:`auto_symmetric`."""
    if options.attention_op == "auto":
        geometric = all(a.geometric for a in model.attention_layers())
        options = dataclasses.replace(options, attention_op=auto_attention_op(options.dtype, geometric))
    if options.symmetric is None:
        grid = recorded_grid(model.config.raw)
        if grid is not None and options.weight_format in ("int8", "int4") and grid.block_size == options.block_size:
            symmetric = grid.symmetric
        else:
            symmetric = auto_symmetric(options.weight_format, options.attention_op)
        options = dataclasses.replace(options, symmetric=symmetric)
    return options


def lossless_on_grid(model: DiJiangForCausalLM, options: ExportOptions) -> bool:
    """Whether ``options``' int8/int4 rounding reproduces ``model``'s linear weights
    exactly because a quantization-aware fine-tune left them on a grid it nests:
    same block size, and the same bits and symmetry, or an asymmetric int4 grid
    exported as asymmetric int8 (see :mod:`~dijiang_deploy.quantization.grid`).

    The record in ``config.json`` is only a claim: the weights are checked
    against the grid (a few seconds for SmolLM2), and a checkpoint edited
    after the fine-tune falls back to the calibrated export with a warning.
    """

    grid = recorded_grid(model.config.raw)
    if grid is None or options.weight_format not in ("int8", "int4") or grid.block_size != options.block_size:
        return False
    bits = 8 if options.weight_format == "int8" else 4
    if grid.symmetric != bool(options.symmetric):
        return False
    if not (grid.bits == bits or (grid.bits == 4 and bits == 8 and not grid.symmetric)):
        return False
    off = WeightGrid(model, grid).max_offgrid()
    if off > ON_GRID_TOLERANCE:
        log.warning(
            "config.json records a quant-aware int%d grid, but weights are up to %.3g off it "
            "(edited after fine-tuning?): calibrating and rounding as usual", grid.bits, off,
        )
        return False
    return True


def auto_symmetric(weight_format: str, attention_op: str) -> bool:
    """What ``symmetric=None`` becomes: asymmetric (False) for int4 ``inline`` graphs, else symmetric."""
    return not (weight_format == "int4" and attention_op == "inline")


class StepGraph(nn.Module):
    """The traced step: (tokens, mask, positions, states) -> (logits, states)."""

    def __init__(self, model: DiJiangForCausalLM, options: ExportOptions):
        super().__init__()
        self.model = model
        self.last_only = options.logits == "last"
        self.core = ops.packed_core(options.max_chunk)

    def forward(self, input_ids, attention_mask, past_position, *past_state):
        state = DiJiangState(list(past_state), past_position)
        out = self.model.step(
            input_ids, state, attention_mask, core=self.core, last_logits_only=self.last_only
        )
        return (out.logits, *out.state.layers)


def io_specs(model: DiJiangForCausalLM, options: ExportOptions) -> tuple[list[TensorSpec], list[TensorSpec]]:
    cfg = model.config
    act = "float16" if options.dtype == "fp16" else "float32"
    state = ["batch", *cfg.state_shape]
    inputs = [
        TensorSpec("input_ids", ["batch", "sequence"], "int64"),
        TensorSpec("attention_mask", ["batch", "sequence"], "int64"),
        TensorSpec("past_position", ["batch"], "int64"),
    ] + [TensorSpec(f"past_state.{i}", state, "float32") for i in range(cfg.num_layers)]
    logits_len = 1 if options.logits == "last" else "sequence"
    outputs = [TensorSpec("logits", ["batch", logits_len, cfg.vocab_size], act)] + [
        TensorSpec(f"present_state.{i}", state, "float32") for i in range(cfg.num_layers)
    ]
    return inputs, outputs


@contextlib.contextmanager
def quiet_exporter():
    """Run torch.onnx.export without its log, warning and stdout noise
    ("torchvision is not installed" and the like), gradients off."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def trace(model: DiJiangForCausalLM, options: ExportOptions, as_program: bool = False):
    """Trace ``model`` with the torch dynamo exporter into an ONNX model.

    The recurrence is left as one ``DiJiangLinearAttention`` node per layer.
    Returns the ``ModelProto``, or with ``as_program`` the exporter's
    ``ONNXProgram`` (which can save a graph past 2 GiB with external data).
    """
    register_schema()
    cfg = model.config
    dtype = torch.float16 if options.dtype == "fp16" else torch.float32
    if dtype != torch.float32 and model.head.weight.dtype != dtype:
        model = copy.deepcopy(model).cast(dtype)
    graph = StepGraph(model, options)
    batch, seq = 2, 3
    example = (
        torch.ones(batch, seq, dtype=torch.int64),
        torch.ones(batch, seq, dtype=torch.int64),
        torch.zeros(batch, dtype=torch.int64),
        *(torch.zeros(batch, *cfg.state_shape) for _ in range(cfg.num_layers)),
    )
    b = torch.export.Dim("batch", min=1, max=1024)
    s = torch.export.Dim("sequence", min=1, max=8192)
    # *past_state is one varargs entry for torch.export: its shapes go in one tuple.
    dynamic = ({0: b, 1: s}, {0: b, 1: s}, {0: b}, tuple({0: b} for _ in range(cfg.num_layers)))
    inputs, outputs = io_specs(model, options)
    with quiet_exporter():
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=[t.name for t in inputs],
            output_names=[t.name for t in outputs],
            opset_version=PORTABLE_OPSET,
            custom_translation_table=ops.translation_table(),
            optimize=True,
            verbose=False,
        )
    return program if as_program else program.model_proto


def checkpoint_sha256(folder: Path) -> str:
    """Hash of config.json and the weight files: ties an export to its source."""
    digest = hashlib.sha256()
    names = ["config.json"] + sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    for name in names:
        digest.update(name.encode())
        with open(folder / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def export_model(
    model: DiJiangForCausalLM,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    tokenizer_dir: str | Path | None = None,
    source: dict | None = None,
    overwrite: bool = False,
    *,
    consume: bool = False,
) -> Manifest:
    """Export ``model`` into ``out_dir`` (atomically) and return its manifest.

    Graphs past 1 GiB keep their weights in ``model.onnx.data``; an
    ``inline`` export of such a model streams its weights there while the
    graph is built (an int8/int4 one hands them to the quantizer instead),
    so it holds no second copy of them. ``model`` is left unchanged unless
    ``consume`` (the caller is done with it), which lets calibration rescale
    it in place instead of copying its layers.
    """
    options = options or ExportOptions()
    options.validate()
    options = resolve_attention_op(model, options)
    started = time.time()
    quantized = options.weight_format in ("int8", "int4")
    calibration = None
    if quantized and options.calibrate:
        if lossless_on_grid(model, options):
            calibration = {"method": "none", "reason": "weights already on this grid (finetune --quant-aware)"}
        else:
            model, calibration = _calibrated(model, options, tokenizer_dir, in_place=consume)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        sink = None
        if large and options.attention_op == "inline":
            hand_over = _quantizer_inputs(model, options) if quantized else None
            sink = ExternalData(tmp / (MODEL_FILE + ".data"), hand_over=hand_over)
        try:
            proto, opset = _step_graph(model, options, sink, tmp / MODEL_FILE if large else None)
        finally:
            if sink is not None:
                sink.close()
        _fix_io_types(proto, *io_specs(model, options))
        quantization: dict = {}
        if quantized:
            proto, quantization = _quantized(proto, options, calibration, sink.handed_over if sink else None, tmp)
            if large and sink is None:
                # The traced graph's data file still holds the float weights just quantized.
                reload_external_data(proto, tmp)
        manifest = _manifest(model, options, proto, opset, quantization, source)
        save_graph(proto, tmp / MODEL_FILE)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.exists():
                    (tmp / name).write_bytes(src.read_bytes())
            write_chat_format(tmp)
        manifest.export_seconds = round(time.time() - started, 1)
        manifest.graph_sha256 = graph_sha256(tmp, MODEL_FILE)
        manifest.write(tmp)
    return manifest


def _step_graph(model: DiJiangForCausalLM, options: ExportOptions, sink, path: Path | None) -> tuple[onnx.ModelProto, int]:
    """The graph ``options`` ask for, and its default-domain opset.

    With ``path`` (a large model) a traced graph is saved there with its
    weights as external data straight from the exporter, and only the graph
    (without its data) is read back to be edited.
    """
    if options.attention_op == "inline":
        return build_step_graph(model, options.logits, options.dtype, sink=sink), DIRECT_OPSET
    program = trace(model, options, as_program=True)
    if path is None:
        proto = program.model_proto
    else:
        program.save(str(path), external_data=True)
        del program
        proto = onnx.load(str(path), load_external_data=False)
    apply_flavor(proto, options.attention_op)
    return proto, STANDARD_OPSET if options.attention_op == "linear-attention" else PORTABLE_OPSET


def _quantizer_inputs(model: DiJiangForCausalLM, options: ExportOptions):
    """Which of the inline graph's weights the quantizer is handed rather than
    finding them in the graph: the linear weights (and an untied head, when
    quantized), read from the PyTorch weights a slice at a time
    (:func:`~..quantization.nbits.quantize_matmuls`), so the graph never holds
    float copies of them. A tied head's embedding is written to the data file
    (the ``Gather`` needs it) and read back from there memory-mapped.
    """

    def hand_over(name: str) -> bool:
        if name == "head.weight_t":
            return options.head_quantized and not model.config.tie_word_embeddings
        return name.endswith(".weight_t")

    return hand_over


def _quantized(proto: onnx.ModelProto, options: ExportOptions, calibration: dict | None,
               sources: dict | None, base_dir: Path) -> tuple[onnx.ModelProto, dict]:
    # The 8-bit head of an int4 graph keeps level 4 whatever the body uses:
    # ONNX Runtime 1.32 has no fast float32-activation 8-bit kernel for it.
    head_level = DEFAULT_ACCURACY_LEVEL[8] if options.weight_format == "int4" else None
    proto = quantize_weights(proto, options, accuracy_level=options.accuracy_level, calibration=calibration,
                             head_accuracy_level=head_level, in_place=True, sources=sources, base_dir=base_dir)
    return proto, {k: v for k, v in (quantization_info(proto) or {}).items() if k != "quantized_nodes"}


def _manifest(model: DiJiangForCausalLM, options: ExportOptions, proto: onnx.ModelProto, opset: int,
              quantization: dict, source: dict | None) -> Manifest:
    inputs, outputs = io_specs(model, options)
    cfg = model.config
    return Manifest(
        model_file=MODEL_FILE, flavor=options.attention_op, opset=opset, dtype=options.dtype,
        weights=options.weight_format, logits=options.logits, max_chunk=options.max_chunk, inputs=inputs,
        outputs=outputs, num_layers=cfg.num_layers, state_shape=list(cfg.state_shape),
        decay="geometric" if any(a.geometric for a in model.attention_layers()) else "general",
        position_limit=model.position_limit, vocab_size=cfg.vocab_size, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, decode_ops_per_layer=decode_op_counts(proto, cfg.num_layers),
        quantization=quantization, source=source or {}, config=cfg.to_hf_dict(),
    )


def write_chat_format(folder: Path) -> bool:
    """Write ``chat_format.json`` (the template as per-role strings, for the C runtime)
    when the folder's chat template has that form; False (and a warning) otherwise."""

    template = load_chat_template(folder)
    if template is None:
        return False
    try:
        fmt = ChatFormat.derive(template)
    except ExportError as exc:
        log.warning("no %s: %s (the C runtime will not render chats for this model)", CHAT_FORMAT_FILE, exc)
        return False
    (folder / CHAT_FORMAT_FILE).write_text(json.dumps(fmt.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return True


def _calibrated(
    model: DiJiangForCausalLM, options: ExportOptions, tokenizer_dir: str | Path | None, in_place: bool
) -> tuple[DiJiangForCausalLM, dict]:
    """``model`` rescaled for ``options``' quantizer (a copy unless ``in_place``), and its record."""

    seq_len = min(256, options.calibration_tokens)
    config = CalibrationConfig(tokens=options.calibration_tokens, seq_len=seq_len, data=options.calibration_data)
    ids, source = calibration_ids(tokenizer_dir, model.config.vocab_size, config)
    scaled, report = calibrate_for_quantization(
        model, ids, BITS[options.weight_format], options.block_size, options.symmetric, config.search_rows,
        in_place=in_place,
    )
    record = report.to_record() | source
    return scaled, record


def _fix_io_types(proto: onnx.ModelProto, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Check the traced graph's I/O against the contract we publish."""
    got = [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in proto.graph.input]
    want = [(t.name, t.dtype) for t in inputs]
    if got != want:
        raise ExportError(f"traced inputs {got} differ from the contract {want}")
    got = [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in proto.graph.output]
    want = [(t.name, t.dtype) for t in outputs]
    if got != want:
        raise ExportError(f"traced outputs {got} differ from the contract {want}")


def export_checkpoint(
    model_dir: str | Path, out_dir: str | Path, options: ExportOptions | None = None, overwrite: bool = False
) -> Manifest:
    """Load a DiJiang checkpoint folder and export it (see :func:`export_model`)."""
    model_dir = Path(model_dir)
    options = options or ExportOptions()
    # A traced fp16 export casts the model before tracing; loaded as fp16 it
    # is held once, not as float32 plus a half copy (the inline builder and
    # the quantizers round from float32 themselves).
    half = options.weight_format == "fp16" and options.attention_op != "inline"  # auto is traced for fp16
    model = load_model(model_dir, dtype=torch.float16 if half else torch.float32)
    source = {"checkpoint": str(model_dir.resolve()), "sha256": checkpoint_sha256(model_dir)}
    return export_model(model, out_dir, options, tokenizer_dir=model_dir, source=source, overwrite=overwrite,
                        consume=True)


__all__ = [
    "ATTENTION_OPS", "ExportOptions", "MODEL_FILE", "OP_TYPE", "export_checkpoint", "export_model", "lossless_on_grid",
    "trace",
]
