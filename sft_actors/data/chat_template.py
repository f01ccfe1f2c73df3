"""Chat templates: a conversation → text, split into prompt and response segments.

A model's chat template is a Jinja2 template (Hugging Face ``tokenizer_config.json``
``chat_template``, a ``chat_template.jinja`` file beside it, or a GGUF's
``tokenizer.chat_template`` metadata). It is rendered the way transformers'
``apply_chat_template`` renders it (``transformers/utils/chat_template_utils.py``): a
``jinja2.sandbox.ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, the ``tojson`` filter (no HTML escaping, ``ensure_ascii=False``), the
globals ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``, and the variables
``messages``, ``add_generation_prompt``, ``tools`` / ``documents`` (None), ``bos_token`` and
``eos_token``; ``{% generation %}`` blocks render their body. Templates are untrusted code:
the sandbox refuses access to Python internals (a :class:`~sft_actors.errors.DatasetCorrupt`
for the conversation being rendered).

Response spans are found the standard way: for the *i*-th assistant message, the conversation
before it is rendered with ``add_generation_prompt=True`` (the prompt ends where the response
starts) and the conversation through it without (the response ends there, end-of-turn markers
included). Both must be prefixes of the whole rendering; a template for which they are not
(one that rewrites earlier turns) is refused with a :class:`~sft_actors.errors.ConfigError`
suggesting ``chat_template = "none"``.

Without a template the plain format is used (documented in the README)::

    System: {content}\\n\\nUser: {content}\\n\\nAssistant: {content}<EOS>\\n\\nUser: …

where ``{content}<EOS>`` of each assistant message is the response (the EOS token is appended
by the tokenizer step, not rendered as text).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sft_actors.errors import ConfigError, DatasetCorrupt

ROLES = ("system", "user", "assistant")
Message = tuple[str, str]  # (role, content)
Segment = tuple[str, bool]  # (text, is the response)
_PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def template_from_config(value: Any, where: str) -> str | None:
    """The template a ``tokenizer_config.json`` ``chat_template`` value names: a string, or a
    list of ``{"name", "template"}`` of which ``"default"`` (or the only one) is used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {d.get("name"): d.get("template") for d in value if isinstance(d, dict)}
        chosen = (
            named.get("default")
            if "default" in named
            else (next(iter(named.values())) if len(named) == 1 else None)
        )
        if isinstance(chosen, str):
            return chosen
        raise ConfigError(f"{where}: chat_template lists {sorted(map(str, named))} but no 'default' template")
    raise ConfigError(f"{where}: chat_template is a {type(value).__name__}, not a string or a list")


@lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """The compiled template (cached); a syntax error is a :class:`ConfigError`."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Generation(jinja2.ext.Extension):
        """``{% generation %}…{% endgeneration %}`` renders its body (transformers marks the
        assistant's tokens with it; the spans here come from rendering prefixes instead)."""

        tags = {"generation"}  # noqa: RUF012 - jinja2 declares it an instance attribute

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = jinja2.utils.Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(
            f"the chat template does not parse: {exc.message} (template line {exc.lineno})"
        ) from exc


def load_template_file(path: str | Path) -> str:
    """A template from a file (``chat_template = "<path>"``): the text of a ``.jinja`` file, or
    the ``chat_template`` of a ``tokenizer_config.json``. Raises :class:`ConfigError`."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read chat template {p}: {exc}; give a .jinja file or tokenizer_config.json"
        ) from exc
    if p.suffix == ".json":
        try:
            value = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ConfigError(f"{p}: not a JSON object with a chat_template") from exc
        template = template_from_config(value, str(p))
        if template is None:
            raise ConfigError(f"{p} has no chat_template; give a .jinja file instead")
        text = template
    compile_template(text)
    return text


class ChatRenderer:
    """Renders conversations into :data:`Segment` lists with ``template`` (None: plain format)."""

    def __init__(
        self, template: str | None, *, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        self.template = template
        self.compiled = compile_template(template) if template is not None else None
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    @property
    def plain(self) -> bool:
        return self.compiled is None

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        assert self.compiled is not None
        chat = [{"role": role, "content": content} for role, content in messages]
        text: str = self.compiled.render(
            messages=chat,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special,
        )
        return text

    def segments(self, messages: Sequence[Message], source: str) -> list[Segment]:
        """The conversation as text pieces in order, each flagged response or not."""
        if self.compiled is None:
            return _plain_segments(messages)
        import jinja2

        try:
            return self._template_segments(messages)
        except jinja2.TemplateError as exc:
            raise DatasetCorrupt(f"{source}: the chat template refuses this conversation: {exc}") from exc

    def _template_segments(self, messages: Sequence[Message]) -> list[Segment]:
        full = self.render(messages, add_generation_prompt=False)
        out: list[Segment] = []
        done = 0
        for i, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(prompt) and full.startswith(through) and len(prompt) >= done):
                raise ConfigError(
                    "the chat template renders earlier turns differently once later ones follow, so "
                    'response spans cannot be found; use chat_template = "none" or another template'
                )
            if len(prompt) > done:
                out.append((full[done : len(prompt)], False))
            if len(through) > len(prompt):
                out.append((full[len(prompt) : len(through)], True))
            done = len(through)
        if len(full) > done:
            out.append((full[done:], False))
        return out


def _plain_segments(messages: Sequence[Message]) -> list[Segment]:
    out: list[Segment] = []
    for i, (role, content) in enumerate(messages):
        sep = "\n\n" if i else ""
        if role == "assistant":
            out.append((f"{sep}Assistant: ", False))
            out.append((content, True))
        else:
            out.append((f"{sep}{_PLAIN_NAMES[role]}: {content}", False))
    return out
