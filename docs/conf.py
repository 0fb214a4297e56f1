"""Sphinx configuration of the overfocus-jax documentation.

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

The tutorials are MyST notebooks executed on every build, on the CPU.
"""

import inspect
import os
import pathlib
import tomllib

# The notebooks' kernels inherit this process's environment: run them on the CPU whatever the machine holds.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _version() -> str:
  try:
    import overfocus_jax
    return overfocus_jax.__version__
  except (ImportError, AttributeError):
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


project = "overfocus-jax"
author = "the overfocus-jax authors"
copyright = "the overfocus-jax authors, Apache-2.0"
release = _version()
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
nitpicky = False
# The docstrings write `name` for code, as markdown does.
default_role = "code"

# -- API reference: autodoc, autosummary, napoleon (Google-style Args:/Returns:/Raises:) --------------------------
autosummary_generate = True
autosummary_imported_members = False
# `:members:` is given on each directive: a default of True would override a directive's own list of members.
autodoc_default_options = {"undoc-members": False, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- Notebooks: MyST markdown, executed at build time ------------------------------------------------------------
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# -- HTML ----------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"overfocus-jax {release}"
html_static_path = []
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "home_page_in_toc": True,
    # One search field, the sidebar's: pydata-sphinx-theme would add a second one in a header bar of its own.
    "navbar_persistent": [],
}


def _skip_class_fields(app, what, name, obj, skip, options):
  """Leaves out a class's data attributes (dataclass and NamedTuple fields): its docstring's "Attributes:" section
  describes them, and the package documents no attribute on its own."""
  del app, name, skip, options
  if what == "class" and not (inspect.isroutine(obj) or inspect.isclass(obj) or isinstance(obj, property)):
    return True
  return None


def setup(app):
  app.connect("autodoc-skip-member", _skip_class_fields)
