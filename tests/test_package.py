"""Package-level promises: a light import, a model package that travels as remote code, a CLI."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(REPO, "mptkit", "model")


def test_import_mptkit_loads_neither_torch_nor_the_training_stack():
    code = "import sys, mptkit; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or m.startswith('mptkit.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_package_imports_only_torch_transformers_and_itself():
    allowed_roots = {"torch", "transformers", "__future__", "math", "os", "shutil", "warnings", "dataclasses",
                     "difflib", "typing", "copy", "functools", "contextlib", "itertools", "collections"}
    for name in os.listdir(MODEL_DIR):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(MODEL_DIR, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: another file of the model package
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            # optional accelerators are imported under try/except (transformers' remote-code check skips those)
            assert roots <= allowed_roots or _inside_try(tree, node), f"{name}: imports {roots}"


def _inside_try(tree, target) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(target is child for stmt in node.body for child in ast.walk(stmt)):
            return True
    return False


def test_cli_lists_commands_and_rejects_unknown_ones():
    help_text = subprocess.run([sys.executable, "-m", "mptkit.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "generate", "chat", "serve", "eval", "demo", "data", "export"):
        assert command in help_text
    bad = subprocess.run([sys.executable, "-m", "mptkit.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


def test_every_commands_help_imports_neither_torch_nor_transformers():
    """`mptkit COMMAND --help` is instant (measured ~0.1 s; torch alone takes ~1.5 s to import)."""
    from mptkit.cli import COMMANDS

    code = ("import sys, contextlib, io\nfrom mptkit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main([sys.argv[1], '--help'])\n    except SystemExit:\n        pass\n"
            "assert 'usage' in out.getvalue(), out.getvalue()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))")
    for command in COMMANDS:
        done = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, check=True)
        assert done.stdout.strip() == "[]", f"mptkit {command} --help imports {done.stdout.strip()}"
