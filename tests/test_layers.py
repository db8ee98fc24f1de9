"""The package's layers: imports point downward only, so no circle can come back.

    config  <-  model  <-  parallel, data, metrics  <-  checkpoint, tools  <-  train, infer, interop  <-  CLIs

A module imports its own package and packages of lower layers. Sideways imports inside one layer are
allowed only where listed below, with the reason. No library module imports a command-line module
(dsmoe/*.py at the top: estimate, eval, export, params, plot, run). A `python -m` entry point inside a
package (one with a `__main__` guard, e.g. dsmoe.checkpoint.convert) is a command: it may import any
layer.
"""
from __future__ import annotations

import ast
from pathlib import Path

DSMOE = Path(__file__).resolve().parents[1] / "dsmoe"

LAYER = {"config": 0, "model": 1, "parallel": 2, "data": 2, "metrics": 2, "checkpoint": 3, "tools": 3,
         "train": 4, "infer": 4, "interop": 4}
CLI = 5  # the top-level modules
SIDEWAYS = {
    ("train", "infer"): "training's samples decode with the inference engine",
    ("train", "interop"): "--init-from-hf reads a transformers directory through interop's weight mapping",
    ("interop", "infer"): "an export writes the server's chat template into tokenizer_config.json",
}


def package_of(path: Path) -> str:
    parts = path.relative_to(DSMOE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imports_of(path: Path) -> set[str]:
    """The dsmoe packages (or top-level modules) `path` imports, lazily or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "dsmoe" and len(parts) > 1:
                found.add(parts[1])
    return found


def is_command(path: Path) -> bool:
    return 'if __name__ == "__main__":' in path.read_text()


def test_imports_point_downward_only():
    wrong = []
    for path in sorted(DSMOE.rglob("*.py")):
        source = package_of(path)
        if source == "__init__":
            continue
        level = CLI if is_command(path) else LAYER.get(source, CLI)
        for target in imports_of(path) - {source}:
            target_level = LAYER.get(target, CLI)
            if target_level < level or (source, target) in SIDEWAYS:
                continue
            wrong.append(f"{path.relative_to(DSMOE.parent)} imports dsmoe.{target} "
                         f"({'a command-line module' if target_level == CLI else f'layer {target_level}'}, "
                         f"from layer {level})")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_every_package_has_a_layer():
    packages = {p.name for p in DSMOE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LAYER), f"give these packages a layer in tests/test_layers.py: {packages - set(LAYER)}"


def test_the_readme_layout_names_every_package_and_command():
    readme = (DSMOE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)] if "\n## " in layout[1:] else layout
    packages = [f"dsmoe/{p.name}/" for p in DSMOE.iterdir() if (p / "__init__.py").exists()]
    commands = [p.name for p in DSMOE.glob("*.py") if p.name != "__init__.py"]
    missing = [name for name in packages + commands if name not in layout]
    assert not missing, f"README's Layout section does not name: {missing}"
