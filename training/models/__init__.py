"""One file per mechanism family; importing this package imports every module in it, which registers its
models (timm's habit): adding a family is adding one file here."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
