"""Writes tokenizer fixtures for the ctest tokenizer_hf_parity test.

    python gen_tokenizer_fixtures.py OUT_DIR

Trains small byte-level BPE tokenizers with Hugging Face ``tokenizers`` in the
styles libdijiang implements (GPT-2 ByteLevel with its regex, LLaMA-3's Split
pattern, Digits, prefix spaces, legacy "a b" merges, special and added
tokens with lstrip/rstrip), then records what ``tokenizers`` itself encodes and
decodes for every text of tokenizer_corpus.json. Exit 77 (ctest: skipped)
when ``tokenizers`` is not installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def training_text(corpus: list[str]) -> list[str]:
    base = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "def main():\n    return [x ** 2 for x in range(10) if x % 2 == 0]\n",
        "Il était une fois une princesse qui vivait dans un château. Über alles, schön.",
        "数据 模型 训练 推理 中文 文本 日本語 テキスト 한국어 텍스트",
        "1234567890 3.14 2024-06-01 $100 50% ½",
    ]
    return base * 20 + corpus * 5


def build(kind: str, texts: list[str]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=(kind == "llama3")))
    if kind in ("gpt2", "gpt2_legacy_merges"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif kind == "gpt2_prefix_space":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    elif kind == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif kind == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken("<tool>", lstrip=True, rstrip=True, normalized=False), "hello world"])
    return tok


def main() -> int:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        print("Hugging Face tokenizers is not installed: fixtures skipped", file=sys.stderr)
        return 77
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    corpus = json.loads((Path(__file__).parent / "tokenizer_corpus.json").read_text(encoding="utf-8"))
    train = training_text(corpus)
    names = []
    for kind in ("gpt2", "gpt2_prefix_space", "gpt2_legacy_merges", "llama3", "digits"):
        tok = build(kind, train)
        path = out / f"{kind}.json"
        tok.save(str(path))
        if kind == "gpt2_legacy_merges":
            data = json.loads(path.read_text(encoding="utf-8"))
            data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
            path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
        encs = [tok.encode(t, add_special_tokens=False).ids for t in corpus]
        expected = {"texts": corpus, "ids": encs, "decoded": [tok.decode(e, skip_special_tokens=True) for e in encs]}
        (out / f"{kind}.expected.json").write_text(json.dumps(expected, ensure_ascii=False), encoding="utf-8")
        names.append(kind)
    (out / "index.json").write_text(json.dumps(names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
