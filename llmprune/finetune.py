"""``python -m llmprune.finetune ...`` and ``llmprune.finetune(...)``: one name, both uses.

``llmprune.finetune`` is this module (so ``-m`` finds it) and also callable: its class is
replaced by a ``ModuleType`` subclass whose ``__call__`` is :func:`finetune`. The package's
lazy ``__getattr__`` imports this module and returns it, so ``import llmprune;
llmprune.finetune(...)`` and ``from llmprune.finetune import finetune`` reach the same
function whichever import happened first (importing a submodule sets the package
attribute to the module, which is the callable here, so nothing is overwritten).
"""

import sys
import types

from llmprune.training.run import FinetuneResult, finetune


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> FinetuneResult:
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__call__ = finetune  # for readers; the class attribute above is what Python calls

__all__ = ["FinetuneResult", "finetune"]

if __name__ == "__main__":
    from llmprune.cli.finetune import main

    sys.exit(main())
