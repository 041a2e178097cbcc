"""Can the fast int8 path agree more? Where ONNX Runtime's int8 activation rounding costs.

``MatMulNBits`` at ``accuracy_level`` 4 rounds each activation row to int8 in
blocks of ``block_size`` along K (scale = max|x| / 127). This script
simulates that rounding in PyTorch on every linear layer of a DiJiang
checkpoint whose weights are already on the int8 grid (a ``finetune
--quant-aware`` checkpoint: its int8 export holds exactly its weights, so the
rounding of activations is the only error), scores the first ``--tokens``
held-out tokens against the unrounded model (top-1 agreement, KL
divergence), and prints:

1. the KL share of each layer (that layer left in float activations);
2. top-1 when the N layer groups (attention input, attention output, MLP
   input, MLP down) with the largest KL gain keep float activations
   (mixed precision);
3. the ``alpha`` that ``calibrate.py``'s scale search picks when its error
   also models the activation rounding (SmoothQuant's migration);
4. with ``--ort FP32_EXPORT`` (the float32 export of the same checkpoint):
   top-1 of the real int8 graph with the first layer's matrix products kept
   in float32 (``quantize_export(keep_float=...)``), against that export;
5. with ``--rotation`` (LLaMA family): the same scores after a random
   orthogonal rotation of the residual stream folded into the weights
   (QuaRot/SpinQuant's offline rotation: the same function in exact
   arithmetic, but outlier channels spread over all channels), for the
   activation rounding alone, int8 weight rounding alone (round to nearest,
   blocks along K, no calibration) and both, beside the unrotated model.

Used for docs/quantization.md ("Formats", the int8 rows):

    python benchmarks/int8_activation_study.py CHECKPOINT [--ort FP32_EXPORT]
"""

from __future__ import annotations

import argparse
import copy
import re
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from dijiang_deploy.checkpoint import load_model
from dijiang_deploy.contract.errors import DiJiangError
from dijiang_deploy.quantization import calibrate
from dijiang_deploy.data import heldout_text
from dijiang_deploy.data.text import load_tokenizer

GROUP_OF = {"attn": "attn_in", "o_proj": "o_in", "dense": "o_in", "gate_proj": "mlp_in", "up_proj": "mlp_in",
            "dense_h_to_4h": "mlp_in", "down_proj": "down_in", "dense_4h_to_h": "down_in"}


def round_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x [..., K]`` after level-4 rounding: int8 per block of ``block`` along K, scale max|x|/127."""
    k = x.shape[-1]
    xb = x.reshape(-1, k // block, block)
    s = xb.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (torch.round(xb / s).clamp(-127, 127) * s).reshape(x.shape)


class Rounding:
    """Forward pre-hooks that round each group's input; ``floating`` names the groups left alone."""

    def __init__(self, model, block: int):
        self.floating: set[str] = set()
        self.groups: list[str] = []
        self.handles = []
        for i, layer in enumerate(model.body.layers):
            readers = {"attn": layer.attn}  # q/k/v and W_G all read the attention block's input
            for name, mod in layer.named_modules():
                leaf = name.split(".")[-1]
                if isinstance(mod, torch.nn.Linear) and leaf in GROUP_OF and GROUP_OF[leaf] != "attn_in":
                    readers[leaf] = mod
            for leaf, mod in readers.items():
                key = f"{i}.{GROUP_OF[leaf]}"
                if key not in self.groups:
                    self.groups.append(key)
                self.handles.append(mod.register_forward_pre_hook(self._hook(key, block), with_kwargs=True))

    def _hook(self, key: str, block: int):
        def hook(_m, args, kwargs):
            if key in self.floating:
                return None
            return (round_activations(args[0], block),) + args[1:], kwargs

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def rotate_residual(model, seed: int = 0):
    """A copy of a LLaMA-family ``model`` whose residual stream is ``x @ Q`` (Q random orthogonal).

    RMSNorm commutes with an orthogonal Q once its weight is folded into the
    matrices that read its output (q/k/v, ``W_G``, gate/up, head), so the
    copy computes the same logits; the tied head is untied because the
    embedding and the head now need different matrices. The inputs of o_proj
    and down_proj (products of gates) stay unrotated.
    """
    if model.config.family != "llama":
        raise DiJiangError(f"--rotation supports the llama family only, not {model.config.family}")
    m = copy.deepcopy(model)
    width = m.config.hidden_size
    q, r = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))

    def set_(param, value: torch.Tensor) -> None:
        param.copy_(value.to(param.dtype))

    with torch.no_grad():
        head = m.head.weight.double() * m.body.norm.weight.double()
        m.head.weight = torch.nn.Parameter((head @ q).float())  # unties it from the embedding
        set_(m.body.embed.weight, m.body.embed.weight.double() @ q)
        m.body.norm.weight.fill_(1.0)
        for layer in m.body.layers:
            attn, mlp = layer.attn, layer.mlp
            g_in = layer.input_layernorm.weight.double()
            g_post = layer.post_attention_layernorm.weight.double()
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                set_(lin.weight, lin.weight.double() * g_in @ q)
            set_(attn.W_G, q.T @ (g_in[:, None] * attn.W_G.double()))  # read as x @ W_G
            for lin in (mlp.gate_proj, mlp.up_proj):
                set_(lin.weight, lin.weight.double() * g_post @ q)
            set_(attn.o_proj.weight, q.T @ attn.o_proj.weight.double())
            set_(mlp.down_proj.weight, q.T @ mlp.down_proj.weight.double())
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    return m


def round_weights(model, block: int):
    """A copy with every layer's matrix (W_G included) rounded to int8 per block of K, scale max|w|/127."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.body.layers:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):  # weight [N, K]: the same blockwise rounding along K
                    mod.weight.copy_(round_activations(mod.weight, block))
            layer.attn.W_G.copy_(round_activations(layer.attn.W_G.T, block).T)
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--ort", metavar="FP32_EXPORT", help="also measure the real graph with layer 0 in float32")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--rotation", action="store_true", help="only the rotation study (section 5)")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens must be >= 2")
    torch.set_num_threads(2)
    try:
        model = load_model(args.checkpoint)
    except DiJiangError as exc:
        parser.error(str(exc))
    widths = {model.config.hidden_size, model.config.intermediate_size}
    if args.block_size < 1 or any(w % args.block_size for w in widths):
        parser.error(f"--block-size must divide the layer widths {sorted(widths)}, got {args.block_size}")
    tok = load_tokenizer(args.checkpoint, model.config.vocab_size)
    ids = torch.tensor([tok.encode(heldout_text())[: args.tokens]])

    @torch.no_grad()
    def logits(m) -> torch.Tensor:
        return m(ids, mode="chunked").logits.float()[0]

    ref = logits(model)
    ref_lp = ref.log_softmax(-1)

    def score(m) -> tuple[float, float]:
        lg = logits(m)
        top1 = float((lg.argmax(-1) == ref.argmax(-1)).float().mean())
        return top1, float(F.kl_div(lg.log_softmax(-1), ref_lp, log_target=True, reduction="batchmean"))

    if args.rotation:
        try:
            rotated = rotate_residual(model)
        except DiJiangError as exc:
            parser.error(str(exc))
        drift = float((logits(rotated) - ref).abs().max())
        print(f"rotated model in float32: top-1 {100 * score(rotated)[0]:.2f}%, max |logit change| {drift:.2g}")
        for label, m in (("unrotated", model), ("rotated", rotated)):
            hooks = Rounding(m, args.block_size)
            acts = score(m)
            hooks.remove()
            rounded = round_weights(m, args.block_size)
            weights = score(rounded)
            hooks = Rounding(rounded, args.block_size)
            both = score(rounded)
            hooks.remove()
            print(f"{label:9s}  top-1 / KL: activations rounded {100 * acts[0]:.2f}% {acts[1]:.5f}, "
                  f"int8 weights {100 * weights[0]:.2f}% {weights[1]:.5f}, both {100 * both[0]:.2f}% {both[1]:.5f}")
        return

    rounding = Rounding(model, args.block_size)
    top1, kl_all = score(model)
    print(f"all activations rounded: top-1 {100 * top1:.2f}%  KL {kl_all:.5f}")
    gain: dict[str, float] = {}
    for key in rounding.groups:
        rounding.floating = {key}
        gain[key] = kl_all - score(model)[1]
    layers = sorted({int(k.split(".")[0]) for k in gain})
    shares = {i: sum(v for k, v in gain.items() if int(k.split(".")[0]) == i) / kl_all for i in layers}
    print("KL share per layer (sum of its groups' gains): " + ", ".join(f"{i}: {100 * s:.0f}%" for i, s in shares.items()))
    order = sorted(gain, key=gain.get, reverse=True)
    for n in (4, 8, 16, 32, 48, 64):
        rounding.floating = set(order[:n])
        top1, kl = score(model)
        print(f"{n:3d} of {len(order)} groups at float activations: top-1 {100 * top1:.2f}%  KL {kl:.5f}")
    rounding.remove()

    block = args.block_size

    def joint_error(x, weights, refs, s, quantize):
        xs = round_activations(x / s, block)
        return sum(float((xs @ quantize(w * s).T - r).pow(2).sum()) for w, r in zip(weights, refs))

    plain_error = calibrate._quantized_error
    calibrate._quantized_error = joint_error
    try:
        cal, _ = calibrate.calibration_ids(args.checkpoint, model.config.vocab_size)
        _, report = calibrate.calibrate_for_quantization(copy.deepcopy(model), cal, 8, block, False, progress=False)
    finally:
        calibrate._quantized_error = plain_error
    record = report.to_record()
    print(f"scale search with activation rounding: mean alpha {record['mean_alpha']}, relative error "
          f"{record['relative_error_before']} -> {record['relative_error_after']} (summed over groups)")

    if args.ort:
        import onnx

        from dijiang_deploy.export import ExportOptions
        from dijiang_deploy.contract.manifest import Manifest
        from dijiang_deploy.export.quantized import quantize_export
        from dijiang_deploy.quantization.select import find_linear_weights
        from dijiang_deploy.runtime import Generator

        manifest = Manifest.load(args.ort)
        graph = onnx.load(f"{args.ort}/{manifest.model_file}", load_external_data=False)
        first = [w.node for w in find_linear_weights(graph)[0] if re.match(r"layers\.0\.", w.weight)]
        want = Generator.from_pretrained(args.ort, load_tokenizer=False).score(ids.numpy())
        with tempfile.TemporaryDirectory() as tmp:
            for label, keep in (("all int8", ()), (f"layer 0 in float32 ({len(first)} nodes)", first)):
                quantize_export(args.ort, f"{tmp}/{len(keep)}", ExportOptions(weights="int8"), keep_float=keep)
                got = Generator.from_pretrained(f"{tmp}/{len(keep)}", load_tokenizer=False).score(ids.numpy())
                print(f"ONNX Runtime int8 export, {label}: top-1 {100 * np.mean(got.argmax(-1) == want.argmax(-1)):.2f}%")


if __name__ == "__main__":
    main()
