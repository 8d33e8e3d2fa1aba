"""Find, configure and register the plugins a policy names, in policy order.

A plugin is found, in this order, by:

1. ``module: "pkg.mod:Class"`` (or ``"pkg.mod"`` for a module of hook functions)
   in its policy section;
2. its name among the built-in plugins (:data:`BUILTINS`, imported by name:
   the core never imports a plugin module itself);
3. its name among installed entry points in the group ``mailgate.plugins``.

A plugin class may declare ``Config``, a :class:`PluginConfig` model; the keys
of its policy section (apart from the common ones in :class:`PluginSettings`)
are validated against it and the instance is built as ``Class(config)``. A
``ValueError``, ``TypeError`` or ``re.error`` raised by ``__init__`` is
reported at the plugin's section, like a validation error (any other
exception too, named, without a traceback).

Before a plugin is registered its side of the contract is checked: its rule
ids in ``rule_modes`` (and in a ``rules:`` map) against its ``RULES``
declaration (:mod:`mailgate.rules`), and its hook implementations against the
spec (:mod:`mailgate.hookspecs`): no wrappers, no unknown hook names, no
argument the spec does not offer. Every problem is reported with its position.

A plugin may list the concrete ids of its placeholder rules with
``configured_rules()`` (:func:`mailgate.rules.configured_rules`); an id that
is no instance of a declared placeholder is a load error.

A plugin may expose ``default_rule_modes`` (a mapping of rule id to mode, as
``headers`` and ``helo`` do for ``monitor``/``off`` under their ``rules:``);
the policy's ``rule_modes`` win over it. Every policy gets its own
``pluggy.PluginManager``: there is no global one.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import pluggy
from pydantic import Field, ValidationError

from mailgate import hookspecs
from mailgate.policy import Policy, StrictModel, parse_policy, validation_messages
from mailgate.rules import (
    Rule,
    configured_rules,
    declared_rules,
    rules_in_use,
    unknown_rule_message,
)
from mailgate.units import Duration
from mailgate.yamlsource import Document, Path, SourceError

ENTRY_POINT_GROUP = "mailgate.plugins"
STAGES = ("on_connect", "on_helo", "on_mail", "on_rcpt", "on_data")
EVENTS = ("on_startup", "on_shutdown", "on_delivered", "on_disconnect")

BUILTINS: dict[str, str] = {
    "dnsbl": "mailgate.plugins.dnsbl:Dnsbl",
    "helo": "mailgate.plugins.helo:Helo",
    "ratelimit": "mailgate.plugins.ratelimit:RateLimit",
    "greylist": "mailgate.plugins.greylist:Greylist",
    "spf": "mailgate.plugins.spf:Spf",
    "headers": "mailgate.plugins.headers:Headers",
    "dkim": "mailgate.plugins.dkim:Dkim",
    "arc": "mailgate.plugins.arc:Arc",
    "dmarc": "mailgate.plugins.dmarc:Dmarc",
    "rspamd": "mailgate.plugins.rspamd:Rspamd",
    "spamassassin": "mailgate.plugins.spamassassin:SpamAssassin",
    "clamav": "mailgate.plugins.clamav:Clamav",
    "relay_access": "mailgate.plugins.relay_access:RelayAccess",
    "auth_results": "mailgate.plugins.auth_results:AuthResults",
}
"""The built-in plugins, by name, in their default order."""

ALWAYS_LOADED: dict[str, str] = {
    "relay_access": "an open relay is never a trial",
    "auth_results": "forged Authentication-Results headers are always removed",
}
"""Built-ins loaded even when the policy does not name them (last), and why they are
always enforced: neither may run in ``monitor`` or ``off`` mode, nor monitor a rule."""

Mode = Literal["enforce", "monitor", "off"]


class PluginConfig(StrictModel):
    """Base for a plugin's own config model: unknown keys are errors, types are not coerced."""


class PluginSettings(StrictModel):
    """Keys every plugin section may have, whatever the plugin."""

    module: str | None = None
    """``pkg.mod:Class`` or ``pkg.mod``: load the plugin from there."""
    mode: Mode = "enforce"
    """``monitor`` evaluates and logs but never changes a reply; ``off`` does not load it."""
    timeout: Duration = 10.0
    """The longest one hook call may take; past it the client gets 451 4.3.0."""
    rule_modes: dict[str, Mode] = Field(default_factory=dict)
    """Per rule id: ``monitor`` or ``off`` for that rule only."""

    def mode_of(self, rule_id: str) -> Mode:
        """The mode for a verdict with ``rule_id``: its ``rule_modes`` entry, else ``mode``."""
        if self.mode != "enforce":
            return self.mode if self.rule_modes.get(rule_id) != "off" else "off"
        return self.rule_modes.get(rule_id, "enforce")


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    """A configured plugin instance and its common settings."""

    name: str
    plugin: object
    settings: PluginSettings
    rules: tuple[Rule, ...] | None = None
    """The rule ids it declares (``RULES``); None when it declares none."""
    concrete: tuple[Rule, ...] = ()
    """The concrete ids its config gives its placeholders (``configured_rules()``)."""

    @property
    def rules_in_use(self) -> tuple[Rule, ...]:
        """Its declared rules, each placeholder followed by its concrete instances."""
        return rules_in_use(self.rules or (), self.concrete)


@dataclass(frozen=True, slots=True)
class PluginSet:
    """The plugins of one policy, registered with their own plugin manager."""

    manager: pluggy.PluginManager
    plugins: dict[str, LoadedPlugin]

    def call_order(self, hook: str) -> list[str]:
        """The plugin names whose ``hook`` runs, in the order they run."""
        impls = reversed(getattr(self.manager.hook, hook).get_hookimpls())
        return [impl.plugin_name for impl in impls]


def _import_target(target: str) -> object:
    module_name, _, attr = target.partition(":")
    module: ModuleType = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def builtin_plugins() -> dict[str, object]:
    """The built-in plugin classes by name, in default order (each module imported by name)."""
    return {name: _import_target(target) for name, target in BUILTINS.items()}


def _entry_point(name: str) -> object | None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            loaded: object = ep.load()
            return loaded
    return None


def _resolve(name: str, settings: PluginSettings) -> object:
    if settings.module:
        try:
            return _import_target(settings.module)
        except (ImportError, AttributeError) as exc:
            raise LookupError(f"cannot load {settings.module!r}: {exc}") from None
    if name in BUILTINS:
        return _import_target(BUILTINS[name])
    found = _entry_point(name)
    if found is None:
        close = difflib.get_close_matches(name, BUILTINS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LookupError(
            f"unknown plugin {name!r}{hint}: not built in ({', '.join(BUILTINS)}), no entry "
            f"point in {ENTRY_POINT_GROUP!r}, and no 'module:' given"
        )
    return found


def _instantiate(target: Any, raw: dict[str, Any]) -> object:
    """Build the plugin object; raise ValidationError, TypeError or ValueError on bad config."""
    if not inspect.isclass(target):
        if raw:
            raise TypeError(f"takes no settings, got {', '.join(sorted(raw))}")
        return target
    cls: Any = target
    config_model = getattr(cls, "Config", None)
    if config_model is None:
        if raw:
            raise TypeError(f"takes no settings, got {', '.join(sorted(raw))}")
        return cls()
    return cls(config_model.model_validate(raw))


def _rule_errors(
    doc: Document, prefix: Path, rules: tuple[Rule, ...], section: Mapping[str, Any]
) -> dict[str, list[str]]:
    """Unknown rule ids in ``rule_modes`` and in a ``rules:`` map, with a "did you mean"."""
    errors: dict[str, list[str]] = {"rule_modes": [], "rules": []}
    for key in errors:
        named = section.get(key)
        if not isinstance(named, Mapping):
            continue  # ratelimit's rules: is a list of limits, not rule ids
        for rule_id in named:
            if isinstance(rule_id, str) and not any(rule.matches(rule_id) for rule in rules):
                message = unknown_rule_message(rule_id, rules)
                errors[key].append(doc.error((*prefix, key, rule_id), message))
    return errors


def _argnames(function: Any) -> list[str]:
    """The arguments a hook implementation asks for (those without a default), as pluggy."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in kinds and p.default is p.empty]


def _hook_errors(plugin: object, manager: pluggy.PluginManager) -> list[str]:
    """What breaks the hook contract in ``plugin``'s hook implementations."""
    errors = []
    for attr in dir(plugin):
        try:
            opts = manager.parse_hookimpl_opts(plugin, attr)
        except Exception:  # an attribute that cannot be read is not a hook
            continue
        if opts is None:
            continue
        hook = opts.get("specname") or attr
        if opts.get("wrapper") or opts.get("hookwrapper"):
            kind = "wrapper" if opts.get("wrapper") else "hookwrapper"
            errors.append(
                f"hook {attr} is a {kind}: mailgate calls each hook itself and refuses "
                "wrapper and hookwrapper implementations"
            )
            continue
        spec = getattr(manager.hook, hook, None)
        if spec is None or spec.spec is None:
            close = difflib.get_close_matches(hook, (*STAGES, *EVENTS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            errors.append(f"{hook} is not a mailgate hook{hint}")
            continue
        offered = spec.spec.argnames
        taken = _argnames(getattr(plugin, attr))
        extra = [arg for arg in taken if arg not in offered]
        if extra:
            errors.append(
                f"hook {hook} takes {', '.join(extra)}, which mailgate does not offer "
                f"(it offers: {', '.join(offered) or 'nothing'})"
            )
    return errors


def load_plugins(sections: Mapping[str, Any], doc: Document) -> PluginSet:
    """Load, configure and register the plugins of ``sections`` (plus the always-loaded ones).

    ``sections`` is the policy's ``plugins:`` map. Raises :class:`SourceError`
    with every problem found, each with its position.
    """
    manager = pluggy.PluginManager("mailgate")
    manager.add_hookspecs(hookspecs)
    errors: list[str] = []
    loaded: list[LoadedPlugin] = []
    common = set(PluginSettings.model_fields)
    named = dict(sections)
    for name in ALWAYS_LOADED:
        named.setdefault(name, {})
    for name, section in named.items():
        prefix: Path = ("plugins", name)
        section = section or {}
        try:
            settings = PluginSettings.model_validate(
                {k: v for k, v in section.items() if k in common}
            )
        except ValidationError as exc:
            errors.extend(validation_messages(doc, exc, prefix))
            continue
        if name in ALWAYS_LOADED and not settings.module:
            bad: list[tuple[Path, str]] = []
            if settings.mode != "enforce":
                bad.append(((*prefix, "mode"), settings.mode))
            bad += [
                ((*prefix, "rule_modes", rule_id), mode)
                for rule_id, mode in settings.rule_modes.items()
                if mode != "enforce"
            ]
            for path, mode in bad:
                why = f"{name} is always enforced, never {mode}: {ALWAYS_LOADED[name]}"
                errors.append(doc.error(path, why))
            if bad:
                continue
        if settings.mode == "off":
            continue
        try:
            target = _resolve(name, settings)
        except LookupError as exc:
            errors.append(doc.error((*prefix, "module") if settings.module else prefix, str(exc)))
            continue
        rules = declared_rules(target)
        rule_errors = _rule_errors(doc, prefix, rules, section) if rules is not None else {}
        errors += rule_errors.get("rule_modes", []) + rule_errors.get("rules", [])
        if rule_errors.get("rules"):
            continue  # its config model would report the same ids again
        try:
            plugin = _instantiate(target, {k: v for k, v in section.items() if k not in common})
        except ValidationError as exc:
            errors.extend(validation_messages(doc, exc, prefix))
            continue
        except (TypeError, ValueError) as exc:
            errors.append(doc.error(prefix, str(exc)))
            continue
        except re.error as exc:  # not a ValueError: a bad pattern compiled in __init__
            errors.append(doc.error(prefix, f"bad regular expression: {exc}"))
            continue
        except Exception as exc:  # a plugin's own bug: say so, without a traceback
            errors.append(doc.error(prefix, f"cannot be built: {type(exc).__name__}: {exc}"))
            continue
        hook_errors = _hook_errors(plugin, manager)
        errors.extend(doc.error(prefix, f"invalid plugin: {e}") for e in hook_errors)
        if hook_errors or rule_errors.get("rule_modes"):
            continue
        defaults: Mapping[str, Mode] = getattr(plugin, "default_rule_modes", None) or {}
        if defaults:
            merged = {**defaults, **settings.rule_modes}
            settings = settings.model_copy(update={"rule_modes": merged})
        declared = declared_rules(plugin)
        try:
            concrete = configured_rules(plugin, declared or ())
        except ValueError as exc:
            errors.append(doc.error(prefix, f"invalid plugin: {exc}"))
            continue
        except Exception as exc:  # a plugin's own bug: say so, without a traceback
            why = f"configured_rules() failed: {type(exc).__name__}: {exc}"
            errors.append(doc.error(prefix, f"invalid plugin: {why}"))
            continue
        loaded.append(LoadedPlugin(name, plugin, settings, declared, concrete))
    if errors:
        raise SourceError(errors)
    # pluggy calls the last registered first: register in reverse to run in policy order.
    for item in reversed(loaded):
        try:
            manager.register(item.plugin, name=item.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            errors.append(doc.error(("plugins", item.name), f"invalid plugin: {exc}"))
    if errors:
        raise SourceError(errors)
    return PluginSet(manager, {item.name: item for item in loaded})


def build_plugins(policy: Policy, doc: Document) -> PluginSet:
    """:func:`load_plugins` for a validated policy's ``plugins:`` map."""
    return load_plugins(policy.plugins, doc)


def _position(doc: Document, message: str) -> tuple[int, int]:
    match = re.match(re.escape(doc.filename) + r":(\d+):(\d+):", message)
    return (int(match.group(1)), int(match.group(2))) if match else (sys.maxsize, 0)


def _raw_sections(doc: Document) -> dict[str, Any]:
    """The ``plugins:`` map as written, for checking plugins when the core keys are bad."""
    data = doc.data.get("plugins") if isinstance(doc.data, dict) else None
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict | None)}


def load_policy(doc: Document) -> tuple[Policy, PluginSet]:
    """Validate the core keys and every plugin section in one pass.

    Raises :class:`SourceError` with every problem, core and plugins together,
    in file order.
    """
    errors: list[str] = []
    policy: Policy | None = None
    try:
        policy = parse_policy(doc)
    except SourceError as exc:
        errors.extend(exc.messages)
    plugin_set: PluginSet | None = None
    try:
        plugin_set = load_plugins(policy.plugins if policy else _raw_sections(doc), doc)
    except SourceError as exc:
        errors.extend(exc.messages)
    if errors or policy is None or plugin_set is None:
        raise SourceError(sorted(errors, key=lambda m: _position(doc, m)))
    return policy, plugin_set
