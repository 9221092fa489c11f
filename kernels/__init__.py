"""GPU/CPU attention and KV kernels, installed as ``redknot_rag.kernels`` (pyproject's ``package-dir``).

Invariant: this folder is never the top-level module ``kernels``. That name belongs to Hugging Face's
``kernels`` package, which transformers (>= 5.25) imports whenever it is installed. From the checkout's
root (``python3 -m pytest``, ``python3 -c``) the root comes first on ``sys.path``, so ``import kernels``
finds this folder before site-packages. When that happens the lines below hand the import on to the
first ``kernels`` found elsewhere on the path (or fail as if this folder were not there), so the
checkout behaves like any other directory. ``tests/test_architecture.py`` checks this.

Why here and not in the layout: the folder keeps its top-level name (the product card fixes it), it
must be a regular package for setuptools' editable and wheel installs to map it under ``redknot_rag``
(a namespace folder is not found below a regular package by the editable finder), and a regular
package on ``sys.path[0]`` always wins the lookup. So the package itself declines the wrong name.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = PathFinder.find_spec("kernels", _path)
    # The import system returns whatever sys.modules holds once this body ends.
    if _spec is None or _spec.loader is None:
        # Nothing else provides `kernels`: stand in as the empty PEP 420 namespace a folder without
        # __init__.py would give (no __file__, nothing inside), which transformers reads as "not installed".
        sys.modules["kernels"] = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("kernels", None))
        sys.modules["kernels"].__path__ = []
    else:
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["kernels"])
