"""Trains the embedded model's byte-level BPE tokenizer on the docstrings of Python's standard library.

The result is shipped as moebench/assets/tokenizer.json; run this only to remake it:
    python scripts/make_tokenizer.py [--vocab-size 4096]
"""

import argparse
import ast
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's names: eos/pad, chat turn markers


def stdlib_docstrings():
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "moebench" / "assets" / "tokenizer.json"))
    args = ap.parse_args()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    docs = list(stdlib_docstrings())
    tok.train_from_iterator(docs, trainer=trainer)
    tok.save(args.out)
    print(f"trained on {len(docs)} docstrings ({sum(map(len, docs)) / 1e6:.1f} MB): {args.out}")


if __name__ == "__main__":
    main()
