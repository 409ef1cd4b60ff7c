"""setup.py's choices that need no build to check."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_function(name):
    """A function (and the constants it reads) from setup.py, without running setup()."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    keep = [node for node in tree.body if (isinstance(node, ast.FunctionDef) and node.name == name) or (
        isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets))]
    namespace = {"sys": __import__("sys")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name], namespace


def test_a_cuda_build_without_a_visible_gpu_gets_a_default_arch_list(capsys):
    """torch's build stops with an IndexError where no GPU is visible and TORCH_CUDA_ARCH_LIST is unset."""
    cuda_arch_list, names = _setup_function("cuda_arch_list")
    environ = {}
    cuda_arch_list(environ, visible_gpus=0)
    assert environ["TORCH_CUDA_ARCH_LIST"] == names["DEFAULT_CUDA_ARCHS"] == "8.0;9.0+PTX"
    assert "TORCH_CUDA_ARCH_LIST" in capsys.readouterr().err
    environ = {"TORCH_CUDA_ARCH_LIST": "9.0"}
    cuda_arch_list(environ, visible_gpus=0)
    assert environ["TORCH_CUDA_ARCH_LIST"] == "9.0"  # the user's choice stands
    environ = {}
    cuda_arch_list(environ, visible_gpus=1)
    assert "TORCH_CUDA_ARCH_LIST" not in environ  # torch picks the visible GPU's
