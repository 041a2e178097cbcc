"""Top-1 agreement of an int4/int8 export with its checkpoint, per ``accuracy_level`` choice.

ONNX Runtime's ``MatMulNBits`` rounds activations to int8 at ``accuracy_level``
4 (the export's default). This script copies an export, sets level 0 (float32
activations) on no node, all nodes, or the nodes of one role at a time, and
scores each copy against the PyTorch checkpoint on the first ``--tokens``
tokens of the shipped held-out text (teacher-forced). Roles are told apart by
the ``(K, N)`` of each node, so pass the model's sizes if it is not SmolLM2.
Used for the accuracy-level table of docs/quantization.md:

    python benchmarks/accuracy_levels.py EXPORT_DIR CHECKPOINT_DIR

``--write-body-level LEVEL OUT_DIR`` instead writes a copy of the export with
every body node (not the LM head) at ``LEVEL``, to time with
``compare_exports.py`` (how the int8 float-activation speeds were measured):

    python benchmarks/accuracy_levels.py EXPORT_DIR CHECKPOINT_DIR --write-body-level 0 /tmp/int8_l0
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import torch

from dijiang_deploy.contract.atomic import atomic_dir
from dijiang_deploy.checkpoint import load_model
from dijiang_deploy.contract.manifest import MANIFEST_NAME
from dijiang_deploy.contract.names import QUANT_METADATA_KEY as METADATA_KEY
from dijiang_deploy.runtime import Generator


def roles(hidden: int, qkvg: int, inter: int, vocab: int) -> dict[tuple[int, int], str]:
    """``(K, N)`` of each fused ``MatMulNBits`` of the inline LLaMA graph -> role."""
    return {
        (hidden, qkvg): "q/k/v/W_G",
        (hidden, hidden): "o_proj",
        (hidden, 2 * inter): "gate/up",
        (inter, hidden): "down",
        (hidden, vocab): "LM head",
    }


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(int(a.i) for a in node.attribute if a.name == name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("checkpoint")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--write-body-level", nargs=2, metavar=("LEVEL", "OUT_DIR"),
                        help="write a copy with the body's nodes at LEVEL (0..4) and stop")
    args = parser.parse_args()
    model = load_model(args.checkpoint)
    cfg = model.config
    kv = cfg.num_kv_heads * cfg.head_dim
    role_of = roles(cfg.hidden_size, 2 * cfg.hidden_size + 2 * kv, cfg.intermediate_size, cfg.vocab_size)
    src = Path(args.export_dir)
    if args.write_body_level:
        level_text, out = args.write_body_level[0], Path(args.write_body_level[1])
        if level_text not in {str(i) for i in range(5)} or out.exists():
            parser.error(f"LEVEL must be 0..4 (got {level_text!r}) and {out} must not exist")
        level = int(level_text)
        manifest = json.loads((src / MANIFEST_NAME).read_text())
        m = onnx.load(str(src / "model.onnx"))
        body = [n for n in m.graph.node
                if n.op_type == "MatMulNBits" and role_of.get((_attr(n, "K"), _attr(n, "N"))) != "LM head"]
        if not body or not manifest.get("quantization"):
            parser.error(f"{src}: not an int8/int4 export (no quantized body nodes)")
        for node in body:
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
        # The copy's records must name the level its body now runs at.
        for prop in m.metadata_props:
            if prop.key == METADATA_KEY:
                prop.value = json.dumps(json.loads(prop.value) | {"accuracy_level": level}, sort_keys=True)
        manifest["quantization"]["accuracy_level"] = level
        with atomic_dir(out) as tmp:  # nothing half-written if this fails
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            onnx.save(m, str(tmp / "model.onnx"))
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {out}: body nodes at accuracy level {level}")
        return
    gen = Generator.from_pretrained(src)
    text = resources.files("dijiang_deploy.finetune").joinpath("data/heldout.txt").read_text()
    ids = np.array([gen.tokenizer.encode(text, add_special_tokens=False)[: args.tokens]], dtype=np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(ids), mode="chunked").logits.float().numpy()
    base = onnx.load(str(src / "model.onnx"))

    variants = {"none (all level 4)": set(), "all": set(role_of.values())}
    variants |= {f"{r} only": {r} for r in role_of.values()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, level0 in variants.items():
            m = onnx.ModelProto()
            m.CopyFrom(base)
            for node in m.graph.node:
                if node.op_type == "MatMulNBits" and role_of.get((_attr(node, "K"), _attr(node, "N"))) in level0:
                    for a in node.attribute:
                        if a.name == "accuracy_level":
                            a.i = 0
            out = Path(tmp) / "variant"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(src, out)
            onnx.save(m, str(out / "model.onnx"))
            got = Generator.from_pretrained(out, load_tokenizer=False).score(ids)
            top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
            print(f"level 0 for {name:22s} top-1 {100 * top1:6.2f}%  max |dlogit| {np.abs(got - want).max():.3f}", flush=True)


if __name__ == "__main__":
    main()
