"""A bundle's chat template (Jinja, ``generation.chat_template``), rendered as transformers does.

Training renders chats with ``tokenizer.apply_chat_template``; the device has no
transformers, so this renders the same template the same way: jinja2's immutable sandbox
with ``trim_blocks``/``lstrip_blocks`` and ``loopcontrols``, transformers' ``tojson``,
``raise_exception`` and ``strftime_now``, a ``{% generation %}`` tag that renders its body,
and the tokenizer's special-token strings (``generation.template_variables``: ``bos_token``,
``eos_token``, ...) as variables. jinja2 is imported only for bundles that carry a template.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from moe2edge.runtime.errors import BundleError


def _environment():
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise BundleError(
            "this bundle renders chats with its Jinja chat template: pip install jinja2 "
            "(it is in moe2edge[runtime])"
        ) from exc

    class Generation(Extension):  # transformers' assistant-span marker: the body as it is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, jinja2.exceptions.TemplateError


class ChatTemplate:
    """A compiled chat template and the variables it is rendered with."""

    def __init__(self, source: str, variables: dict[str, Any] | None = None):
        env, self._error = _environment()
        try:
            self._template = env.from_string(source)
        except self._error as exc:
            raise BundleError(f"the bundle's chat template is not valid Jinja ({exc})") from exc
        self.variables = dict(variables or {})

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """``messages`` (``{"role", "content"}`` dicts) as the template writes them."""
        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.variables,
            )
        except self._error as exc:
            raise ValueError(f"the chat template refused the conversation: {exc}") from exc
