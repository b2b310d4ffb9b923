"""Sphinx directives that write reference pages from the code at build time:

    ```{config-reference}
    ```                         every configuration key (irtf_reference.config_reference)
    ```{registry-table}
    ```                         the registered composers, encoders, datasets, losses, GA methods
    ```{tool-reference}
    ```                         `python tools/<name>.py --help` of every tool
    ```{public-api}
    ```                         autodoc of every name in keras_irtf.__all__

Each produces MyST Markdown and parses it in place, so the pages cannot drift from the code.
"""

from __future__ import annotations

from sphinx.util.docutils import SphinxDirective

import irtf_reference as ref


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _allowed(text: str) -> str:
    if " | " in text:
        return ", ".join(_code(t) for t in text.split(" | "))
    if text.startswith("any of "):
        return "any of " + ", ".join(_code(t) for t in text[len("any of "):].split(", "))
    return _cell(text)


def config_markdown() -> str:
    lines = []
    for section in ref.config_reference():
        lines += ["", f"## `{section.title}`" if ":" not in section.title else f"## {section.title}", ""]
        if section.intro:
            lines += [section.intro, ""]
        lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for key in section.keys:
            lines.append(f"| `{key.name}` | {_cell(key.type)} | {_code(_cell(key.default))} | "
                         f"{_allowed(key.allowed)} | {_cell(key.meaning)} |")
    return "\n".join(lines) + "\n"


def tools_markdown() -> str:
    lines = []
    for name in ref.TOOLS:
        lines += ["", f"## `tools/{name}.py`", "", "```text", ref.tool_help(name).rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def api_markdown() -> str:
    """autodoc directives (reStructuredText, inside MyST's eval-rst) for every public name."""
    import keras_irtf

    lines = []
    for name in ref.public_names():
        obj = getattr(keras_irtf, name)
        if name == "Benchmark":  # the same class as Experiment, under the name user scripts use
            lines += ["", f"## `keras_irtf.{name}`", "",
                      "`Benchmark` is another name of [`Experiment`](#keras_irtf.Experiment): the class of "
                      "what `load_benchmark` returns.", ""]
            continue
        if isinstance(obj, type):
            directive = [f".. autoclass:: keras_irtf.{name}", "   :members:"]
        else:
            directive = [f".. autofunction:: keras_irtf.{name}"]
        lines += ["", f"## `keras_irtf.{name}`", "", "```{eval-rst}", *directive, "```", ""]
    return "\n".join(lines) + "\n"


class _MarkdownDirective(SphinxDirective):
    has_content = False

    def markdown(self) -> str:
        raise NotImplementedError

    def run(self):
        renderer = getattr(self.state, "_renderer", None)
        if renderer is None:
            raise self.error(f"{self.name} is a directive of MyST Markdown pages")
        # rendered in place, as MyST's {include} does, so that its headings become sections of the page
        renderer.nested_render_text(self.markdown(), self.lineno)
        return []


class ConfigReference(_MarkdownDirective):
    def markdown(self):
        return config_markdown()


class RegistryTable(_MarkdownDirective):
    def markdown(self):
        return ref.registry_table() + "\n"


class ToolReference(_MarkdownDirective):
    def markdown(self):
        return tools_markdown()


class PublicAPI(_MarkdownDirective):
    def markdown(self):
        return api_markdown()


def setup(app):
    app.add_directive("config-reference", ConfigReference)
    app.add_directive("registry-table", RegistryTable)
    app.add_directive("tool-reference", ToolReference)
    app.add_directive("public-api", PublicAPI)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
