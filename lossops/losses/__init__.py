"""The loss families, one module each; importing this package registers every family it holds
(lossops._family.FAMILIES), from which lossops exports the functions and lossops.nn the Modules."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
