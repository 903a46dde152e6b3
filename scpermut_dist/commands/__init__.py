"""Sub-commands of `scpermut`; see `scpermut_dist.commands.main`."""
