"""Grouped matrix multiplication (MegaBlocks, Gale et al. 2023; megablox): rows sorted by
group, group i multiplied by its own matrix. Entry points: `ops.gmm`, `ops.tgmm`."""
