"""Where Argilla is and how to sign in: one setting away from the local stack to a real deployment.

Looked up in this order: ``ARGILLA_API_URL`` / ``ARGILLA_API_KEY`` (the SDK's
own variable names), a config file (``api_url``, ``api_key``, ``workspace``,
at the top level or under ``argilla:``), then the local stack started by
``align argilla up`` (its state file gives the URL; its key is the default
one). The key is a ``SecretStr``: it is never printed, logged or put in an
error message.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from align.argilla.install import default_home
from align.config import StrictConfig, load_config, read_yaml
from align.errors import AlignError

if TYPE_CHECKING:
    import argilla as rg

START_HINT = "start the local one with `align argilla up`, or set ARGILLA_API_URL and ARGILLA_API_KEY"


class ArgillaUnavailable(AlignError):
    """Argilla could not be reached or refused the key."""


class ArgillaSettings(StrictConfig):
    api_url: str
    api_key: SecretStr
    workspace: str | None = None
    timeout: float = 60.0
    source: str = "settings"  # where api_url came from, for messages


def resolve_settings(config: str | Path | None = None, *, home: Path | None = None,
                     workspace: str | None = None) -> ArgillaSettings:
    values: dict[str, object] = {}
    source = None
    if config is not None:
        data, _ = read_yaml(config)
        section = data.get("argilla", data)
        values.update({k: v for k, v in section.items() if k in ("api_url", "api_key", "workspace", "timeout")})
        source = str(config) if "api_url" in values else None
    for key, env in (("api_url", "ARGILLA_API_URL"), ("api_key", "ARGILLA_API_KEY")):
        if os.environ.get(env):
            values[key] = os.environ[env]
            source = env if key == "api_url" else source
    if "api_url" not in values:
        from align.argilla.local import DEFAULT_API_KEY, read_state

        local_home = Path(home or default_home())
        state = read_state(local_home)
        if state is None:
            raise ArgillaUnavailable(f"no Argilla configured and no local one in {local_home}: {START_HINT}")
        values["api_url"] = state.url
        values.setdefault("api_key", DEFAULT_API_KEY)
        source = f"local stack ({state.home})"
    if "api_key" not in values:
        raise ArgillaUnavailable(f"no API key for {values['api_url']}: set ARGILLA_API_KEY or api_key in the config")
    if workspace:
        values["workspace"] = workspace
    values["source"] = source or "settings"
    return load_config(ArgillaSettings, updates=values)


def connect(settings: ArgillaSettings) -> "rg.Argilla":
    """An SDK client, or an error that names the URL tried and how to get a running Argilla."""
    import httpx

    from align import extras

    rg = extras.argilla()
    from argilla._exceptions import ArgillaCredentialsError

    url = settings.api_url
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client = rg.Argilla(api_url=url, api_key=settings.api_key.get_secret_value(), timeout=int(settings.timeout))
            client.me  # the SDK checks the key lazily; ask now so a wrong key fails here
    except ArgillaCredentialsError:
        raise ArgillaUnavailable(f"Argilla at {url} (from {settings.source}) refused the API key: check "
                                 "ARGILLA_API_KEY (the local stack's key is printed by `align argilla up`)") from None
    except (httpx.HTTPError, OSError) as exc:
        raise ArgillaUnavailable(f"cannot reach Argilla at {url} (from {settings.source}): "
                                 f"{type(exc).__name__}: {exc}; {START_HINT}") from None
    return client
