"""Build Stable Diffusion's CLIP tokenizer files (vocab.json, merges.txt) offline.

Development-time only. CLIP's byte-pair-encoding table ships inside the PyPI
package ``open_clip_torch`` as ``bpe_simple_vocab_16e6.txt.gz``. We read it from
the wheel (no install, so torch is not pulled in) and write the two files that
``transformers.CLIPTokenizer`` loads, into ``src/opendaam/assets/clip_tokenizer``.

Usage::

    pip download --no-deps open_clip_torch -d /tmp/oc
    python tools/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "opendaam" / "assets" / "clip_tokenizer"
N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the table


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    # Order matters: CLIP's vocabulary lists the printable bytes first, then the rest.
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
        text = gzip.decompress(zf.read(name)).decode("utf-8")
    merges = [tuple(line.split()) for line in text.split("\n")[1 : N_MERGES + 1]]
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(tokens)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
