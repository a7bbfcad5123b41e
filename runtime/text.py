"""Text in and out, when a checkpoint ships a tokenizer (`tokenizer.json`, read with the optional
`tokenizers` package). The runtime itself works on token ids; this is only for the CLI."""

from __future__ import annotations

from pathlib import Path

from qwen3next_trt.errors import InputError


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{path}: not found: --prompt needs a checkpoint that ships its tokenizer "
                             "(else give --prompt-ids, or --prompt-bytes for byte-level models)")
        try:
            import tokenizers
        except ImportError:
            raise InputError(f"{path}: reading it needs the 'tokenizers' package (pip install tokenizers)") from None
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library's parse errors have no common type
            raise InputError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0][:200]})") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)
