"""Transfer evaluations of an exported crossflow backbone (sibling LightningModules)."""
