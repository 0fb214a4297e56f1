"""The named regularizer settings the experiment scripts compare: name -> config overrides ``[(FIELD, VALUE)]``.

Shared by ``shortcut.py`` and ``no_collapse.py`` so that a name means the same run in every table. SGDrop names:

- ``sgdrop_{granularity}_{rho}``: the paper's rule with an exact count (``rule=topk``: ⌈ρN⌉ units dropped);
- ``sgdrop_paper``: the paper's rule at the paper's setting (exact count, element, ρ = 0.1), whatever the defaults;
  ``sgdrop_paper_quantile`` the same with the formula as written, ``1[A ≤ quantile(A, 1 − ρ)]`` (``rule=quantile``);
- ``sgdrop_mass[_{granularity}]_{m}[_ramp{r}][_half]``: the attribution-mass rule with share ``m`` and cap
  ``rate=0.5``, element units unless a granularity is named, the drop ramped in over ``r`` epochs if named, on a
  random half of each batch (``batch_fraction=0.5``) if ``_half``;
- ``sgdrop``: whatever the config's SGDrop fields are (the library's default on the shipped configs; today the same
  run as ``sgdrop_mass_spatial_0.5_ramp1_half``); ``sgdrop_ema`` the same with the paper's EMA teacher (decay 0.99);
- ``sgdrop_element_0.1_ema``: the paper's whole design (its rule and setting, attribution from the EMA teacher).
"""

SGDROP = ("regularizer.name", "sgdrop")
MASS_SHARES = (0.1, 0.25, 0.5, 0.75, 0.9)
RAMPS = (1, 2)
MASS_CAP = 0.5


# Every field a name does not set is the paper's, whatever the library's defaults are: a name always means the same
# run (the results files hold runs from before the defaults changed).
PAPER_FIELDS = dict(rule="topk", rate=0.1, mass=0.5, granularity="element", batch_fraction=1.0, ramp_epochs=0,
                    rescale=False, target="true", ema_decay=0.0)


def sgdrop(**fields) -> list[tuple[str, str]]:
  """``sgdrop(rule="mass", mass=0.5)`` -> ``[("regularizer.name", "sgdrop"), ("regularizer.sgdrop.rule", "mass"),
  ...]``, every SGDrop field set (``PAPER_FIELDS`` for those not given)."""
  return [SGDROP] + [(f"regularizer.sgdrop.{field}", str(value)) for field, value in {**PAPER_FIELDS, **fields}.items()]


def regularizer_fields(config) -> dict:
  """The regularizer's settings the run actually used (a name like ``sgdrop`` follows the library's defaults)."""
  name = config.regularizer.name
  return config.regularizer[name].to_dict() if name in config.regularizer else {}


def _mass_methods() -> dict[str, list[tuple[str, str]]]:
  methods = {}
  for granularity, infix in (("element", ""), ("spatial", "spatial_"), ("channel", "channel_")):
    for share in MASS_SHARES:
      base = dict(rule="mass", mass=share, rate=MASS_CAP, granularity=granularity)
      for ramp in (0,) + RAMPS:
        for half in (False, True):
          name = f"sgdrop_mass_{infix}{share}{f'_ramp{ramp}' if ramp else ''}{'_half' if half else ''}"
          methods[name] = sgdrop(**base, **({"ramp_epochs": ramp} if ramp else {}),
                                 **({"batch_fraction": 0.5} if half else {}))
  return methods


METHODS = {
    "erm": [("regularizer.name", "none")],
    "sgdrop": [SGDROP],
    "sgdrop_paper": sgdrop(),
    "sgdrop_paper_quantile": sgdrop(rule="quantile"),
    **{f"sgdrop_paper_ramp{ramp}": sgdrop(rule="topk", rate=0.1, granularity="element", ramp_epochs=ramp)
       for ramp in RAMPS},
    "sgdrop_paper_half": sgdrop(rule="topk", rate=0.1, granularity="element", batch_fraction=0.5),
    **{f"sgdrop_{granularity}_{rate}": sgdrop(rule="topk", rate=rate, granularity=granularity)
       for granularity in ("element", "spatial", "channel") for rate in (0.03, 0.1, 0.3)},
    "sgdrop_element_0.1_ema": sgdrop(rule="topk", rate=0.1, granularity="element", ema_decay=0.99),
    "sgdrop_spatial_0.3_ema": sgdrop(rule="topk", rate=0.3, granularity="spatial", ema_decay=0.99),
    # The library's default attributing with the paper's EMA teacher (every other field the config's).
    "sgdrop_ema": [SGDROP, ("regularizer.sgdrop.ema_decay", "0.99")],
    **_mass_methods(),
    "rsc": [("regularizer.name", "rsc")],
    # RSC's official rule in one mode only (its default picks spatial or channel with probability 1/2 each step).
    "rsc_channel": [("regularizer.name", "rsc"), ("regularizer.rsc.spatial_probability", "0.0")],
    "rsc_spatial": [("regularizer.name", "rsc"), ("regularizer.rsc.spatial_probability", "1.0")],
    "rsc_domainbed": [("regularizer.name", "rsc_domainbed")],
}
