"""Names every layer agrees on: graph inputs/outputs, the recurrence node, file names.

No torch, no onnx: the runtime, the native runtime and the TensorRT plugin
read the same strings (``plugins/README.md`` is the plugin's side of it).
"""

from __future__ import annotations

#: Files of an export folder.
MODEL_FILE = "model.onnx"
MANIFEST_NAME = "manifest.json"
#: Per-role text of the chat template, checked against the template at export
#: time, for runtimes without a Jinja engine (the C runtime).
CHAT_FORMAT_FILE = "chat_format.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

#: Tokenizer files a checkpoint, an export and an engine folder carry alike.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)

#: Step graph inputs and outputs (per layer ``i`` for the states).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
PAST_POSITION = "past_position"
LOGITS = "logits"


def past_state(i: int) -> str:
    return f"past_state.{i}"


def present_state(i: int) -> str:
    return f"present_state.{i}"


#: ``metadata_props`` key of a quantized graph holding its quantization record (JSON).
QUANT_METADATA_KEY = "dijiang_deploy.quantization"
#: Weight formats stored as integers, with their bit widths.
INTEGER_WEIGHTS = {"int8": 8, "int4": 4}

#: The recurrence node of the traced flavors (``function``/``plugin``).
DOMAIN = "com.dijiang_deploy"
OP_TYPE = "DiJiangLinearAttention"
DOMAIN_VERSION = 1
#: TensorRT plugin registration: name = OP_TYPE, this version and namespace.
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "dijiang"
#: The standard operator and the opset that introduced it.
STANDARD_OP = "LinearAttention"
STANDARD_OPSET = 27
#: Default-domain opset of the ``function`` and ``plugin`` flavors.
PORTABLE_OPSET = 21
