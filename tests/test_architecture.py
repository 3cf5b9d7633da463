"""The package's layering (docs/architecture.md): imports between top-level subpackages go
downward only, apart from the few deliberate reads listed here."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mask2former"

LEVEL = {"utils": 0, "config": 0, "checkpoint": 0, "structures": 0, "ops": 1, "layers": 2, "modeling": 3,
         "solver": 3, "data": 4, "evaluation": 4, "engine": 5, "demo": 5, "accel": 5, "export": 5,
         "detectron2": 6}

ALLOWED_UPWARD = {
    # build_model applies the accelerations and MaskFormer.fast_inference toggles them (lazy imports)
    ("mask2former.modeling", "mask2former.accel"),
    ("mask2former.modeling.meta_arch.mask_former", "mask2former.accel"),
    # thing classes come from the dataset's metadata, as in Detectron2's meta architectures
    ("mask2former.modeling.meta_arch.mask_former", "mask2former.data.catalog"),
    # test-time augmentation resizes exactly as the test-time mapper does
    ("mask2former.modeling.test_time_augmentation", "mask2former.data.transforms"),
}


def _imports():
    """(importing module, imported module, line) for every import of mask2former code."""
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                yield module, target, node.lineno
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield module, alias.name, node.lineno


def _level(module):
    parts = module.split(".")
    return LEVEL.get(parts[1]) if len(parts) > 1 and parts[0] == "mask2former" else None


def test_imports_go_down_the_layers():
    edges = list(_imports())
    assert len(edges) > 200  # the walk sees the package's imports
    assert set(LEVEL) >= {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
                          if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists())}
    upward = sorted(f"{a}:{line} -> {b}" for a, b, line in edges
                    if _level(a) is not None and _level(b) is not None and _level(b) > _level(a)
                    and (a, b) not in ALLOWED_UPWARD)
    assert upward == []
