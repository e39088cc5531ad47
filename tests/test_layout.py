"""The package's layout, as docs/design.md describes it: one package per op with the same roles,
one folder per op in csrc/, and no import cycle among erpd's modules (lazy imports inside
functions included)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("linear_logprobs", "linear_kl", "policy_loss", "linear_policy_loss")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in (ROOT / "erpd").rglob("*.py")}


def _imports(path: pathlib.Path, name: str, modules) -> set[str]:
    """The erpd modules that `name` imports anywhere in its body (a package's parent __init__ not
    counted: it runs before the package, whatever the package imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # (erpd._C, the compiled extension, imports nothing from erpd.)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
                       if a.name != "_C"]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check above is not vacuous: two modules importing each other (lazily) are reported."""
    pkg = tmp_path / "erpd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from erpd import b\n")
    (pkg / "b.py").write_text("def f():\n    from erpd.a import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="erpd.a -> erpd.b -> erpd.a"):
        test_no_import_cycles()


@pytest.mark.parametrize("op", OPS)
def test_each_op_is_one_package_and_one_csrc_folder(op):
    pkg = ROOT / "erpd" / "ops" / op
    assert {"__init__.py", "api.py", "function.py", "library.py"} <= {p.name for p in pkg.glob("*.py")}
    assert (ROOT / "csrc" / op).is_dir()


def test_every_package_is_installed():
    """pyproject.toml lists its packages by hand (kernels/ is installed as erpd.kernels): a package
    missing there imports from a checkout but not from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p.parent / "__init__.py") for p in (ROOT / "erpd").rglob("__init__.py")}
    assert found | {"erpd.kernels"} == listed
