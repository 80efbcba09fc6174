"""One way to load a service's config: a pydantic model, one TOML file, env overrides.

Env wins over the file so that one bundle can be adjusted per host
(``EDGE_AGENT_MQTT__HOST=...`` sets ``[mqtt] host``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edge_tier.errors import ConfigError


class ServiceSettings(BaseSettings):
    """Base for every service config. Subclasses set ``env_prefix``."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init kwargs; env must override them.
        return (env_settings, init_settings)


S = TypeVar("S", bound=ServiceSettings)
BUNDLE_PATHS = (("mqtt", "tls_ca"), ("mqtt", "tls_cert"), ("mqtt", "tls_key"), ("control", "signing_key"))


def _describe(err: ValidationError, env_prefix: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        # Name the environment variable when one holds the value (it wins over the file).
        for depth in range(len(e["loc"]), 0, -1):
            var = (env_prefix + "__".join(str(p) for p in e["loc"][:depth])).upper()
            if var in os.environ:
                where += f" (from ${var})"
                break
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load_config(cls: type[S], path: str | Path | None) -> S:
    """Load ``cls`` from ``path`` (None: defaults and env only)."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        where = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read: {e}") from None
    try:
        cfg = cls(**data)
    except ValidationError as e:
        prefix = str(cls.model_config.get("env_prefix", ""))
        raise ConfigError(f"{where}: invalid config:\n{_describe(e, prefix)}") from None
    if path is not None:
        # Credentials named in a config file sit beside it (a device bundle): relative
        # paths are relative to the file, not to wherever the process was started.
        for section, name in BUNDLE_PATHS:
            part = getattr(cfg, section, None)
            value = getattr(part, name, None)
            if value and not Path(value).is_absolute():
                setattr(part, name, type(value)(Path(path).parent / value))
    return cfg
