"""One file per mechanism family; importing this package registers every model."""

from training.models import (
    nonlocal_net,  # noqa: F401
    racnn,  # noqa: F401
)
