"""The training schedule as data: a run is a list of stages, each naming its cells, modules, losses and length.

Keeping the schedule declarative lets one training loop run the authors' schemes, ablations and
atlas-scale variants (lengths in cells seen rather than epochs) without new code paths.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModuleName = Literal["encoder", "decoder", "classifier", "dann"]
LossName = Literal["clas", "dann", "rec"]
SCHEMES = ("scheme8", "scheme13")

# The module a loss term needs in the forward pass (the encoder feeds all of them).
LOSS_MODULE = {"clas": "classifier", "dann": "dann", "rec": "decoder"}


class Stage(BaseModel):
    """One stage of training.

    `cells`: "all" (labelled and unlabelled training cells) or "labelled" (labelled training cells).
    `trains`: modules whose parameters are updated; the others are frozen and kept in eval mode.
    `epochs`: maximum number of epochs; `cells_per_epoch` redefines an epoch as that many sampled
    cells (an atlas epoch is huge); `max_cells_seen` ends the stage after that many cells.
    `early_stopping`: patience in epochs on validation balanced accuracy (best weights restored), or None.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    cells: Literal["all", "labelled"] = "labelled"
    trains: list[ModuleName]
    losses: list[LossName]
    permutation: bool = False
    epochs: int = Field(ge=1)
    cells_per_epoch: int | None = Field(default=None, ge=1)
    max_cells_seen: int | None = Field(default=None, ge=1)
    early_stopping: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Stage":
        if not self.trains:
            raise ValueError(f"stage {self.name!r} trains no module")
        if not self.losses:
            raise ValueError(f"stage {self.name!r} uses no loss term")
        for module in self.trains:
            if module != "encoder" and module not in self.used_modules:
                raise ValueError(
                    f"stage {self.name!r} trains {module!r} but no loss uses it (losses: {self.losses}); "
                    f"add the loss {next(k for k, v in LOSS_MODULE.items() if v == module)!r} or drop the module"
                )
        return self

    @property
    def used_modules(self) -> list[str]:
        """Modules in this stage's forward pass: the encoder plus each loss term's head."""
        return ["encoder"] + [LOSS_MODULE[loss] for loss in ("rec", "clas", "dann") if loss in self.losses]

    def without_dann(self) -> "Stage | None":
        """The stage with the adversary removed (single-batch data: there is no batch effect to remove)."""
        losses = [x for x in self.losses if x != "dann"]
        trains = [m for m in self.trains if m != "dann"]
        if not losses:
            return None
        return self.model_copy(update={"losses": losses, "trains": trains})


def scheme_stages(scheme: str, patience: int = 20) -> list[Stage]:
    """The authors' schemes: 8 (their tuned default) and 13 (their CLI default)."""
    warmup = Stage(name="warmup_dann", cells="all", trains=["encoder", "decoder", "dann"], losses=["dann", "rec"],
                   permutation=True, epochs=36)
    full = Stage(name="full_model", cells="labelled", trains=["encoder", "decoder", "classifier", "dann"],
                 losses=["clas", "dann", "rec"], permutation=False, epochs=100, early_stopping=patience)
    branch = Stage(name="classifier_branch", cells="labelled", trains=["classifier"], losses=["clas"],
                   permutation=False, epochs=50, early_stopping=patience)
    if scheme == "scheme8":
        return [warmup, full, branch]
    if scheme == "scheme13":
        return [full.model_copy(update={"permutation": True}), branch]
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")


def cap_stages(stages: list[Stage], max_epochs: int | None = None, cells_per_epoch: int | None = None) -> list[Stage]:
    """Shorten every stage (quick runs, tests) without rewriting the schedule."""
    out = []
    for s in stages:
        update = {}
        if max_epochs is not None:
            update["epochs"] = min(s.epochs, max_epochs)
        if cells_per_epoch is not None:
            update["cells_per_epoch"] = min(s.cells_per_epoch or cells_per_epoch, cells_per_epoch)
        out.append(s.model_copy(update=update))
    return out
