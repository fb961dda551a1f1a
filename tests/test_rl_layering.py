"""rl/ sits above data/ and train/: nothing below it imports it (deferred imports included)."""
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "torchgraft"


def test_lower_layers_never_import_rl():
    pattern = re.compile(r"^\s*(from|import)\s+torchgraft\.(rl|cli_rl)\b", re.M)
    for layer in ("errors.py", "config.py", "nn", "models", "tools", "peft", "data", "train", "distributed"):
        root = PKG / layer
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for f in files:
            assert not pattern.search(f.read_text()), f"{f.relative_to(PKG)} imports torchgraft.rl"
