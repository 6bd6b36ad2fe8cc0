"""The marked runtime section of a source file, as the standalone module an exported repo carries.

Runtime code (what a repo needs without this project installed) sits between two marker lines in its
module here; the exporter copies that section verbatim, so the tested code and the shipped code are one."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType


def runtime_section(path: str | Path, name: str, doc: str) -> str:
    """The lines between '# ===== BEGIN {name}' and '# ===== END {name} =====' of `path`, under `doc`."""
    text = Path(path).read_text()
    start, end = text.index(f"# ===== BEGIN {name}"), text.index(f"# ===== END {name} =====")
    body = text[text.index("\n", start) + 1:end]
    return f'"""{doc}\n"""\nfrom __future__ import annotations\n\n' + body


def runtime_source(module: ModuleType) -> str:
    """The runtime section of a module that declares RUNTIME_MARK and RUNTIME_DOC (kv_cache, packed_linear)."""
    return runtime_section(module.__file__, module.RUNTIME_MARK, module.RUNTIME_DOC)
