"""sparsec.kernels: the kernel families (one folder each) and the shared build machinery.

The sources live in a folder named ``kernels/`` that installs as ``sparsec.kernels``. Hugging
Face's ``kernels`` distribution has the same top-level name, and transformers >= 5.25 imports it
on load (``from kernels import CUDAProperties``). Whenever the repository root is on ``sys.path``
(Python started in the checkout: ``python -m pytest``, ``python -c``, a script beside the
README), ``import kernels`` finds this folder first and transformers fails to import. So when
this file runs under the top-level name, it hands the name over to the installed ``kernels``
package, if there is one, and defines nothing of its own.
"""

import sys as _sys

if __name__ == "kernels":

    def _hand_over() -> None:
        import importlib.machinery
        import importlib.util
        import os

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        elsewhere = [p for p in _sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
        if spec is None or spec.loader is None:
            return  # nothing else is named kernels: stay an empty module, as before
        module = importlib.util.module_from_spec(spec)
        # The import system returns whatever sys.modules holds after this file runs, so the
        # importer gets the real package; its own `from kernels.x import y` resolve there too.
        _sys.modules[__name__] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del _sys.modules[__name__]
            raise

    _hand_over()
