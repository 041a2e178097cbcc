"""How close ONNX Runtime's int8 weights get the *original* SmolLM2 to its own float32.

The yardstick for issue #7's int8 target (top-1 agreement >= 99% over 1024
tokens): the unmodified softmax model (transformers, from the embedded GGUF),
exported with every position's logits (``export_kv_model(all_logits=True)``),
then quantized by the same ``quantize_weights`` the DiJiang export uses
(``MatMulNBits``, block 32, LM head in float32) at ``accuracy_level`` 4
(activations rounded to int8: ONNX Runtime's fast path) and 0 (float32
activations). Each quantized graph scores the first ``--tokens`` tokens of the
shipped held-out text teacher-forced in one call, against the float32 graph
in ONNX Runtime: top-1 agreement and perplexity change (``quality_report``),
and the share of positions whose float32 top-2 logits are closer than 0.01
(where any rounding may flip the arg-max). Used for docs/quantization.md
("Formats", the int8 rows):

    python benchmarks/int8_reference.py [--work-dir /tmp/int8_reference]

With ``--llamacpp`` (needs llama-cpp-python) it scores the field's usual
CPU 8-bit format instead: the embedded GGUF re-quantized by llama.cpp's own
``llama_model_quantize`` to F32 and to Q8_0 (blocks of 32; llama.cpp's CPU
kernel rounds activations to 8 bits per block too), with the tied
embedding/head at Q8_0 (the file llama.cpp makes by default) or kept F32,
each against the F32 file on the same token ids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from dijiang_deploy.bench.kv_export import KV_MODEL, export_kv_model, kv_geometry, load_hf_base
from dijiang_deploy.export import ExportOptions
from dijiang_deploy.quality import quality_report
from dijiang_deploy.quantization.nbits import quantize_weights
from dijiang_deploy.data import heldout_text

VARIANTS = (
    ("int8 asymmetric, accuracy level 4 (int8 activations)", False, 4),
    ("int8 symmetric, accuracy level 4", True, 4),
    ("int8 asymmetric, accuracy level 0 (float32 activations)", False, 0),
)


def _score(path: Path, feeds: dict[str, np.ndarray], threads: int) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]


def _llamacpp_variants(work: Path, threads: int) -> dict[str, Path]:
    """The embedded GGUF re-quantized by llama.cpp: F32, Q8_0, and Q8_0 with the tied head in F32."""
    import ctypes

    import llama_cpp

    from dijiang_deploy.convert import embedded_model_path

    f32_type = 0  # ggml_type GGML_TYPE_F32
    variants = {
        "F32": (llama_cpp.LLAMA_FTYPE_ALL_F32, None),
        "Q8_0 (llama.cpp default: embedding/head at Q8_0 too)": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, None),
        "Q8_0, embedding/head kept F32": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, f32_type),
    }
    out = {}
    for i, (label, (ftype, head_type)) in enumerate(variants.items()):
        path = work / f"smollm2_llamacpp_{i}.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = ftype, True, threads
            if head_type is not None:
                params.output_tensor_type = head_type  # the tied token_embd counts as the output tensor
            tmp = path.with_suffix(".partial")
            if llama_cpp.llama_model_quantize(str(embedded_model_path("smollm2")).encode(), str(tmp).encode(),
                                              ctypes.byref(params)) != 0:
                raise SystemExit(f"llama.cpp could not quantize to {label}")
            tmp.replace(path)
        out[label] = path
    return out


def _llamacpp_logits(path: Path, ids: np.ndarray, threads: int) -> np.ndarray:
    """Teacher-forced logits ``[1, N, V]`` of llama.cpp for ``ids [1, N]``."""
    from llama_cpp import Llama

    n = ids.shape[1]
    llm = Llama(model_path=str(path), n_ctx=-(-n // 256) * 256, n_batch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    llm.eval(ids[0].tolist())
    return np.array(llm.scores[:n], np.float32)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="/tmp/int8_reference", help="where the float32 and int8 graphs go")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llamacpp", action="store_true", help="score llama.cpp's Q8_0 against its F32 instead")
    args = parser.parse_args()
    if args.tokens < 2 or args.threads < 1:
        parser.error("--tokens must be >= 2 and --threads >= 1")
    from transformers import AutoTokenizer

    from dijiang_deploy.convert import embedded_model_path

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    gguf = embedded_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = np.array([tok.encode(heldout_text(), add_special_tokens=False)[: args.tokens]], np.int64)
    n = ids.shape[1]
    if args.llamacpp:
        files = _llamacpp_variants(work, args.threads)
        ref_label, *others = files
        ref = _llamacpp_logits(files[ref_label], ids, args.threads)
        top2 = np.sort(ref[0], axis=-1)[:, -2:]
        close = float(np.mean(top2[:, 1] - top2[:, 0] < 0.01))
        print(f"original SmolLM2 in llama.cpp, {n} held-out tokens; {ref_label} top-2 logits within 0.01 at "
              f"{100 * close:.2f}% of positions")
        for label in others:
            r = quality_report(_llamacpp_logits(files[label], ids, args.threads), ref, ids)
            print(f"{label:58s} top-1 {100 * r['top1_agreement']:6.2f}%   perplexity change {100 * r['ppl_change']:+.2f}%")
        return
    fp32 = work / KV_MODEL
    model = load_hf_base("smollm2")
    if not fp32.exists():
        export_kv_model(model, work, base="smollm2", all_logits=True)
    geo = kv_geometry(model.config)
    empty = np.zeros((1, geo["kv_heads"], 0, geo["head_dim"]), np.float32)
    feeds = {"input_ids": ids, "position_ids": np.arange(n, dtype=np.int64)[None]}
    feeds |= {f"past_{kind}.{i}": empty for i in range(geo["num_layers"]) for kind in "kv"}
    ref = _score(fp32, feeds, args.threads)
    top2 = np.sort(ref[0], axis=-1)[:, -2:]
    close = float(np.mean(top2[:, 1] - top2[:, 0] < 0.01))
    print(f"original SmolLM2, {n} held-out tokens; float32 top-2 logits within 0.01 at {100 * close:.2f}% of positions")
    proto = onnx.load(str(fp32))
    for label, symmetric, level in VARIANTS:
        path = work / f"int8_{'sym' if symmetric else 'asym'}_l{level}.onnx"
        if not path.exists():
            q = quantize_weights(proto, ExportOptions(weights="int8", symmetric=symmetric), accuracy_level=level)
            onnx.save(q, str(path), save_as_external_data=True, location=path.name + ".data")
        r = quality_report(_score(path, feeds, args.threads), ref, ids)
        print(f"{label:58s} top-1 {100 * r['top1_agreement']:6.2f}%   perplexity change {100 * r['ppl_change']:+.2f}%")


if __name__ == "__main__":
    main()
