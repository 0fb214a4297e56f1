"""Domain generalization: DomainBed's model selection (:mod:`overfocus_jax.dg.selection`) and result tables
(:mod:`overfocus_jax.dg.tables`), read from DomainBed-format ``results.jsonl`` records (Gulrajani & Lopez-Paz 2021,
"In Search of Lost Domain Generalization", arXiv 2007.01434; github.com/facebookresearch/DomainBed). Plain Python
and numpy: no JAX.
Sweeps: :mod:`overfocus_jax.dg.sweep` runs DomainBed's sweep with ``overfocus train`` (checking its configs loads JAX).
"""
